"""TMEM server: the OpenAI-compatible app, sessions, engine and store."""

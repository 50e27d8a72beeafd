"""Python client of the TMEM server, where every chat session owns a LoRA adapter that learns.

It needs only ``httpx`` and ``pydantic``::

    from tmem.client import TMEMClient, NotFoundError

    with TMEMClient("http://127.0.0.1:8000", api_key="sk-...") as tmem:
        alice = tmem.session("alice")
        print(alice.chat("My cat is called Miso.").text)
        alice.teach([("What is my cat called?", "Miso")])
        alice.flush(timeout=60)                     # wait until the adapter has learned it
        with alice.chat("What is my cat called?", stream=True) as stream:
            for chunk in stream:
                print(chunk.delta_text, end="")
        try:
            tmem.session("nobody").info()
        except NotFoundError as err:
            print(err.status_code, err.request_id)

:class:`AsyncTMEMClient` offers the same calls, awaited. The server also speaks plain OpenAI: the
official ``openai`` client works against ``base_url + "/v1"`` with the ``X-Session-ID`` header.
"""

from ._async import AsyncChatStream, AsyncSession, AsyncTMEMClient
from ._sync import ChatStream, Session, TMEMClient
from .errors import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    TMEMError,
    UnprocessableEntityError,
)
from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    DeleteResult,
    FlushResult,
    HealthStatus,
    Memory,
    ModelList,
    QAPair,
    SessionInfo,
)

__all__ = [
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncChatStream",
    "AsyncSession",
    "AsyncTMEMClient",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "ChatStream",
    "ConflictError",
    "DeleteResult",
    "FlushResult",
    "HealthStatus",
    "InternalServerError",
    "Memory",
    "ModelList",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "QAPair",
    "RateLimitError",
    "ServiceUnavailableError",
    "Session",
    "SessionInfo",
    "TMEMClient",
    "TMEMError",
    "UnprocessableEntityError",
]

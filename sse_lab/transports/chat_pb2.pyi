from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ChatRequest(_message.Message):
    __slots__ = ("prompt", "model", "max_tokens", "ttft_ms", "token_ms", "jitter_ms", "seed")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    JITTER_MS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    model: str
    max_tokens: int
    ttft_ms: float
    token_ms: float
    jitter_ms: float
    seed: int
    def __init__(self, prompt: _Optional[str] = ..., model: _Optional[str] = ..., max_tokens: _Optional[int] = ..., ttft_ms: _Optional[float] = ..., token_ms: _Optional[float] = ..., jitter_ms: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("token", "index")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    token: str
    index: int
    def __init__(self, token: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

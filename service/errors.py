"""The service's errors: one base class carrying an HTTP status and a stable code.

Pure Python (no web imports) so the domain core can raise them; `service.app` has the one
handler that turns every error, ours or the framework's, into the one JSON body shape
`{"error": {"status": ..., "code": ..., "message": ...}}`.
"""

from __future__ import annotations

from http import HTTPStatus


class ServiceError(Exception):
    """Base class: `status` is the HTTP status, `code` a stable machine-readable name."""

    status: int = HTTPStatus.INTERNAL_SERVER_ERROR
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        """Extra response headers (e.g. `Retry-After` on a refusal)."""
        return {}


class InvalidImage(ServiceError):
    status = HTTPStatus.BAD_REQUEST
    code = "invalid_image"


class NoImage(ServiceError):
    status = HTTPStatus.BAD_REQUEST
    code = "no_image"


class InvalidMultipart(ServiceError):
    status = HTTPStatus.BAD_REQUEST
    code = "invalid_multipart"


class NotFound(ServiceError):
    status = HTTPStatus.NOT_FOUND
    code = "not_found"


class ModelNotFound(ServiceError):
    status = HTTPStatus.NOT_FOUND
    code = "model_not_found"


class MethodNotAllowed(ServiceError):
    status = HTTPStatus.METHOD_NOT_ALLOWED
    code = "method_not_allowed"


class BodyTooLarge(ServiceError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "body_too_large"


class TooManyImages(ServiceError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "too_many_images"


class ImageTooLarge(ServiceError):
    """Over the per-image side or pixel limit, judged from the header before decoding."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "image_too_large"


class TooManyPixels(ServiceError):
    """The request's images declare more pixels in all than its budget; none was decoded."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "too_many_pixels"


class UnsupportedImageMode(ServiceError):
    """A decodable image whose pixel mode a classifier does not take (e.g. 32-bit float)."""

    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    code = "unsupported_image_mode"


class UnsupportedMediaType(ServiceError):
    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    code = "unsupported_media_type"


class InvalidParameter(ServiceError):
    status = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "invalid_parameter"


class NotReady(ServiceError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "not_ready"


class InvalidInput(ServiceError):
    """Decoded arrays that the model cannot take (wrong shape or dtype, non-finite values)."""

    status = HTTPStatus.BAD_REQUEST
    code = "invalid_input"


class BodyTimeout(ServiceError):
    """The body did not arrive in time (a stalled or lying upload); the connection is closed."""

    status = HTTPStatus.REQUEST_TIMEOUT
    code = "body_timeout"

    @property
    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class Unavailable(ServiceError):
    """Refused without doing the work: the client may retry after `retry_after` seconds.

    `reason` is the bounded label of `rcegate_requests_refused_total`.
    """

    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "unavailable"
    reason = "unavailable"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class QueueFull(Unavailable):
    code = "overloaded"
    reason = "queue_full"


class TooManyRequests(Unavailable):
    """More requests in flight than `max_concurrent_requests`."""

    code = "overloaded"
    reason = "concurrency"


class BodyBudgetExceeded(Unavailable):
    """The request bodies being received together exceed `max_inflight_body_bytes`."""

    code = "overloaded"
    reason = "body_budget"


class DeadlineExceeded(Unavailable):
    """The request's deadline passed before its images reached the model."""

    code = "deadline_exceeded"
    reason = "deadline"


class ShuttingDown(Unavailable):
    """Draining after SIGTERM: requests already accepted finish, new ones go elsewhere."""

    code = "shutting_down"
    reason = "draining"

    @property
    def headers(self) -> dict[str, str]:
        # Also close the connection, so a keep-alive client reconnects to another instance.
        return {**super().headers, "Connection": "close"}


class ClientDisconnected(ServiceError):
    """The client went away; recorded as 499 (nginx's convention), never as a server error."""

    status = 499
    code = "client_disconnected"


# --- Trust and access (issue 12) ---
class Unauthorized(ServiceError):
    """No valid API key; the client is told how to authenticate (RFC 6750)."""

    status = HTTPStatus.UNAUTHORIZED
    code = "unauthorized"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="rcegate"'}


class Throttled(ServiceError):
    """A client flagged as probing the detector (rejection rate far above target_fpr)."""

    status = HTTPStatus.TOO_MANY_REQUESTS
    code = "throttled"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


# --- end of trust and access ---


# -- HTTP protocol and the request path (service/protocol.py) --
class InvalidRequest(ServiceError):
    """A request the HTTP parser refuses (faulty framing such as Content-Length together with
    Transfer-Encoding, bad syntax); the connection is closed, since its framing is unknown."""

    status = HTTPStatus.BAD_REQUEST
    code = "invalid_request"

    @property
    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class HeaderTooLarge(ServiceError):
    """A request head (request line and headers) over `max_header_bytes`."""

    status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    code = "header_too_large"

    @property
    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class LoopBehind(Unavailable):
    """The event loop runs more than `max_loop_lag` behind: refused as the head arrives."""

    code = "overloaded"
    reason = "loop_lag"


# -- end of HTTP protocol --


# -- Hardening (issue 21) --
class Forbidden(ServiceError):
    """Not permitted by the operator's policy: a mode, target_fpr or metric this client may not
    have."""

    status = HTTPStatus.FORBIDDEN
    code = "forbidden"

"""The admin key: routes that change which adapters exist need `Authorization: Bearer <key>` when one is set.

The key comes from the environment, never a flag, so it does not show in the process list.
"""
import hmac
import os

from fastapi import Request

from server.api.errors import UnauthorizedError

ADMIN_KEY_VARIABLE = "LORASERVE_ADMIN_KEY"


def admin_key_from_environment() -> str | None:
    """Read once at start-up; an empty value counts as unset."""
    return os.environ.get(ADMIN_KEY_VARIABLE) or None


def require_admin(request: Request) -> None:
    """FastAPI dependency of the admin routes; open to anyone when the server has no admin key."""
    key: str | None = request.app.state.admin_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest takes as long for a near miss as for a wild guess, so timing reveals nothing of the key.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise UnauthorizedError("this route needs the admin key: send 'Authorization: Bearer <key>'")

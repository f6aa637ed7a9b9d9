"""The admin key: routes that change which adapters exist need `Authorization: Bearer <key>` when one is set.

The key comes from the environment, never a flag, so it does not show in the process list.
"""
import hmac
import os

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from loraserve.api.errors import UnauthorizedError

ADMIN_KEY_VARIABLE = "LORASERVE_ADMIN_KEY"


def admin_key_from_environment() -> str | None:
    """Read once at start-up; an empty value counts as unset."""
    return os.environ.get(ADMIN_KEY_VARIABLE) or None


# Declared as a security scheme, so the OpenAPI document shows which routes need the key and how to send it.
BEARER = HTTPBearer(auto_error=False, scheme_name="adminKey",
                    description=f"The admin key the server was started with ({ADMIN_KEY_VARIABLE}).")


def require_admin(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(BEARER)) -> None:
    """FastAPI dependency of the admin routes; open to anyone when the server has no admin key."""
    key: str | None = request.app.state.admin_key
    if key is None:
        return
    token = credentials.credentials.strip() if credentials is not None else ""
    # compare_digest takes as long for a near miss as for a wild guess, so timing reveals nothing of the key.
    if credentials is None or not hmac.compare_digest(token.encode(), key.encode()):
        raise UnauthorizedError("this route needs the admin key: send 'Authorization: Bearer <key>'")

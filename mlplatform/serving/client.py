"""The caller's side of the decision service: its API key and one decision request.

    key = api_key(platform.storage, platform.config.serving.api_key_env)
    answer = post_decision("http://127.0.0.1:8000", key, {"application_id": "a1", ...})

Used by ``mlp decide``, ``mlp deploy`` and the workloads' sample decisions; a plain HTTP
client (``urllib``), so it needs nothing the server needs.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import urllib.request
from typing import Any

from mlplatform.errors import ServingError

__all__ = ["api_key", "post_decision"]

log = logging.getLogger(__name__)


def api_key(storage: Any, env_name: str) -> str:
    """The API key from ``$env_name``; for a local storage root without one, a generated key
    kept next to the data (``<root>/serving/api_key``, mode 0600) and put into the environment
    of this process. Its path is logged, never the key.

    Raises:
        ServingError: no key in the environment and the root is on S3 (a cluster must be given one).
    """
    key = os.environ.get(env_name)
    if key:
        return key
    if storage.is_s3:
        raise ServingError(f"set the API key in ${env_name} (16+ characters) before deploying to a cluster")
    path = os.path.join(storage.root, "serving", "api_key")
    if os.path.exists(path):
        with open(path) as f:
            key = f.read().strip()
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        key = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        log.warning("no $%s set: generated an API key in %s (export %s=$(cat %s))", env_name, path, env_name, path)
    os.environ[env_name] = key
    return key


def post_decision(url: str, key: str, application: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """POST one application to ``{url}/v1/decisions`` and return the decoded answer.

    Raises:
        OSError: the service did not answer (``urllib.error.URLError`` and HTTP errors are OSErrors).
    """
    request = urllib.request.Request(
        f"{url}/v1/decisions",
        data=json.dumps(application).encode(),
        headers={"Content-Type": "application/json", "X-API-Key": key},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())

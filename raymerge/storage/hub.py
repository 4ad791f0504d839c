"""The Hugging Face Hub: pin a repository path to the commit its revision names now.

A branch (`main`, or any other) can move while a run is planned, executed or resumed. Reading
`hf://org/name@<commit sha>/...` instead reads one commit, whatever happens to the branch.
"""

from __future__ import annotations

from typing import Any


class HubNotAuthorized(Exception):
    """The Hub answered "repository not found": it does not exist, or the token may not read it."""


class HubRevisionNotFound(Exception):
    """The repository exists, the revision does not."""


def pin(fs: Any, path: str) -> tuple[str, str]:
    """(the path pinned to its commit, the commit sha) for `path` of an HfFileSystem `fs`
    ("org/name[@rev][/sub]" -> "org/name@<sha>[/sub]"); one repo-info request."""
    from huggingface_hub import HfApi, constants, parse_hf_uri
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    where = parse_hf_uri(f"hf://{path}")
    if where.is_bucket:  # buckets have no commits: nothing to pin
        return path, ""
    try:
        info = HfApi(endpoint=fs.endpoint, token=fs.token).repo_info(where.id, revision=where.revision,
                                                                     repo_type=where.type)
    except RevisionNotFoundError as e:
        raise HubRevisionNotFound(f"revision {where.revision!r} not found") from e
    except RepositoryNotFoundError as e:  # GatedRepoError included
        status = getattr(e.response, "status_code", None)
        raise HubNotAuthorized(f"the Hub answered {status} for {where.id}") from e
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise HubNotAuthorized(f"the Hub answered {status} for {where.id}: the token was refused") from e
        raise
    if not info.sha:
        return path, ""
    prefix = constants.REPO_TYPES_URL_PREFIXES.get(where.type, "")
    pinned = f"{prefix}{where.id}@{info.sha}"
    return (f"{pinned}/{where.path_in_repo}" if where.path_in_repo else pinned), info.sha

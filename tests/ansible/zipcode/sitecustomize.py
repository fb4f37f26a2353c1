"""Test-only: keep the bytecode Python compiles for modules it imports from a zip file.

Ansible runs every module task as a fresh interpreter importing ansible's module_utils from
a zip it builds per task, and zipimport compiles that source again each time (it never
writes .pyc files): about a fifth of a no-change deploy's CPU in the playbook tests. The
playbook runner puts this directory on PYTHONPATH with QPQ_TEST_ZIPCODE_CACHE naming a
private directory; compiled code is stored by a digest of the interpreter version, the
file's path inside the zip and its source, so a changed module is compiled afresh. Nothing
but the compile step changes: Ansible still builds, ships and runs every module.
"""

from __future__ import annotations

import hashlib
import marshal
import os
import sys
import zipimport
from types import CodeType

_CACHE = os.environ.get("QPQ_TEST_ZIPCODE_CACHE", "")
_compile_source = zipimport._compile_source  # type: ignore[attr-defined]


def _cached_compile(pathname: str, source: bytes) -> CodeType:
    inside_zip = pathname.rpartition(".zip" + os.sep)[2]
    digest = hashlib.sha256(b"\0".join((sys.version.encode(), inside_zip.encode(), source)))
    path = os.path.join(_CACHE, digest.hexdigest())
    try:
        with open(path, "rb") as cached:
            code = marshal.loads(cached.read())
        if isinstance(code, CodeType):
            return code
    except (OSError, ValueError, EOFError, TypeError):
        pass
    code: CodeType = _compile_source(pathname, source)
    partial = f"{path}.{os.getpid()}.partial"
    try:
        with open(partial, "wb") as out:
            out.write(marshal.dumps(code))
        os.replace(partial, path)  # readers see a whole entry or none
    except OSError:
        pass
    return code


# Only a directory that is ours and private: code loaded from it runs as this user.
if _CACHE and os.path.isdir(_CACHE) and os.stat(_CACHE).st_uid == os.getuid() \
        and os.stat(_CACHE).st_mode & 0o077 == 0:
    zipimport._compile_source = _cached_compile  # type: ignore[attr-defined]

"""The PDF reader's own process: reads one PDF on stdin, writes one JSON object on stdout.

`files_app.extraction` runs this file as a script (`python -I pdf_child.py LIMITS`) and kills
it at the deadline: pypdf is pure Python, and a single page can take minutes (a small Flate
stream of text operators expands to millions of characters), so only a separate process can
be stopped mid-page. It imports the standard library and pypdf only, never Django.

LIMITS is a JSON object: `max_pages`, `max_chars`, `memory_bytes` (RLIMIT_AS, 0 = none),
`cpu_seconds` (RLIMIT_CPU, 0 = none) and `parent` (the parent's pid). Should the parent die
(a worker killed mid-task), the child dies with it (Linux: PR_SET_PDEATHSIG), and the CPU
limit stops it elsewhere.

Output: `{"ok": true, "text", "pages", "pages_read", "truncated"}`, or `{"ok": false,
"code", "detail", "pages"}` with `code` one of `encrypted`, `too_many_pages`, `unreadable`,
`memory`. `text` has no NUL and at most `max_chars` characters; `truncated` says whether
text was left out (pages not read, or the text cut).
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import warnings


def limit_resources(memory_bytes: int, cpu_seconds: int) -> None:
    try:
        import resource
    except ImportError:  # not a Unix: the parent's deadline still holds
        return
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    if cpu_seconds:  # soft: SIGXCPU, hard: SIGKILL a second later
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))


def die_with_parent(parent: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent and os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)


def extract(data: bytes, *, max_pages: int, max_chars: int) -> dict:
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data))
    if reader.is_encrypted and not reader.decrypt(""):
        return {"ok": False, "code": "encrypted", "detail": "", "pages": 0}
    total = len(reader.pages)
    if total > max_pages:
        return {"ok": False, "code": "too_many_pages", "detail": "", "pages": total}
    parts: list[str] = []
    size = 0
    read = 0
    for page in reader.pages:
        text = (page.extract_text() or "").replace("\x00", "").strip()
        read += 1
        if text:
            size += len(text) + (2 if parts else 0)
            parts.append(text)
        if size >= max_chars:
            break
    joined = "\n\n".join(parts)
    truncated = read < total or len(joined) > max_chars
    return {"ok": True, "text": joined[:max_chars], "pages": total, "pages_read": read, "truncated": truncated}


def main() -> int:
    limits = json.loads(sys.argv[1])
    die_with_parent(int(limits.get("parent") or 0))
    limit_resources(int(limits.get("memory_bytes") or 0), int(limits.get("cpu_seconds") or 0))
    # pypdf warns about every oddity of a malformed file: nobody reads this process's stderr.
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    data = sys.stdin.buffer.read()
    try:
        result = extract(data, max_pages=int(limits["max_pages"]), max_chars=int(limits["max_chars"]))
    except MemoryError:
        result = {"ok": False, "code": "memory", "detail": "", "pages": 0}
    except RecursionError:
        result = {"ok": False, "code": "unreadable", "detail": "nested too deeply", "pages": 0}
    except Exception as exc:  # pypdf signals malformed input with a spread of exception types
        result = {"ok": False, "code": "unreadable", "detail": str(exc)[:500], "pages": 0}
    # ASCII JSON: an unpaired surrogate pypdf produced travels as an escape (the parent cleans it).
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Walking the configured roots without ever reading what must stay on the box.

The voicemail and recording spools and the key folders are never opened: not
directly, not through a symbolic link, an ``#include`` or a glob. Paths are
checked on their real location (links resolved with ``readlink``, which opens
nothing) before anything is opened, and files are opened relative to a
directory descriptor with ``O_NOFOLLOW`` so that a link swapped in after the
check is refused by the kernel rather than followed. Nothing outside the
configured roots is followed either.

A path check sees names, and a file can have more than one name:

- A hard link is another name for the same inode, anywhere on the same
  filesystem; nothing in its path says that it is also
  ``/var/spool/asterisk/voicemail/.../msg0000.wav`` (systemd's
  ``InaccessiblePaths=`` is by path too, so it does not stop it either). A
  regular file with more than one link (``st_nlink > 1``) is therefore listed
  in the manifest (reason ``hard-link``) and never opened. That rule alone
  closes the hole: a file in a spool that is also reachable from a
  configuration root has at least two links. Its link count is checked again
  on the opened descriptor, so a link made between the ``lstat`` and the
  ``open`` is not read either.
- A bind mount is another name for a whole tree. A folder or file inside a
  root that is a mount point (``/proc/self/mountinfo``, or a device other than
  its root's) is not followed (reason ``mount-point``).
- The forbidden trees' own (device, inode) pairs are taken with ``stat``
  (which opens nothing) and anything inside a root with the same identity is
  ``forbidden``. The trees' contents are deliberately not indexed: that would
  mean listing the spools (opening their folders, which the service unit
  forbids and the privacy tests watch for) and stat-ing every recording on
  each scan, and it would add nothing: a file inside them reachable under
  another name is a hard link, refused above.

Every file that is not read is reported with a reason, never silently dropped.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: Trees whose files are never opened, whatever the configuration says.
ALWAYS_FORBIDDEN: tuple[Path, ...] = (
    Path("/var/spool/asterisk"),
    Path("/etc/asterisk/keys"),
    Path("/var/lib/asterisk/keys"),
    Path("/var/lib/asterisk/sounds/custom"),  # prompts recorded by people: recordings
)

#: File names that are key material by their extension: excluded, never opened.
KEY_SUFFIXES = frozenset({".key", ".pem", ".p12", ".pfx", ".jks", ".der", ".priv", ".p8"})
#: Extensions of binary files (audio, archives, databases): excluded, never opened.
BINARY_SUFFIXES = frozenset(
    {
        ".wav",
        ".gsm",
        ".ulaw",
        ".alaw",
        ".sln",
        ".sln16",
        ".g722",
        ".g729",
        ".mp3",
        ".ogg",
        ".opus",
        ".gz",
        ".tgz",
        ".bz2",
        ".xz",
        ".zip",
        ".tar",
        ".db",
        ".sqlite",
        ".sqlite3",
        ".so",
        ".bin",
        ".png",
        ".jpg",
        ".jpeg",
        ".gif",
        ".pdf",
        ".pyc",
    }
)
MAX_DEPTH = 32
_BINARY_SNIFF = 8192


@dataclass(slots=True)
class Candidate:
    """A regular file that may be sent: where it is and what ``lstat`` said."""

    path: str  # as seen under the configured root
    real: str  # its real location
    root: str  # the configured root it was found under
    size: int
    mode: int
    mtime_ns: int
    ctime_ns: int
    dev: int
    ino: int
    data: bytes | None = None  # read only when the caller asked for it

    @property
    def stamp(self) -> tuple[int, int, int, int, int, int]:
        """What must be equal for a cached digest to still hold."""
        return (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns, self.mode)


@dataclass(frozen=True, slots=True)
class Skipped:
    """A path under the roots that is not sent, and why."""

    path: str
    reason: str
    detail: str = ""
    size: int | None = None
    mode: int | None = None
    #: Found so on reading a candidate (unreadable, binary, changed); ``want`` saw it first.
    after_read: bool = False


@dataclass(frozen=True, slots=True)
class Link:
    """A symbolic link inside the roots to a place inside the roots (sent where it points)."""

    path: str
    target: str  # the real location of what it points to


#: What a walk yields, one at a time, in the order it meets them.
Found = Candidate | Skipped | Link


@dataclass(slots=True)
class Walk:
    """What a walk of the roots found (:func:`walk`: all of it in memory, for small trees)."""

    files: list[Candidate] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)  # link path -> real target in roots


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob as a regex: ``**`` crosses folders, ``*`` and ``?`` do not."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            close = pattern.find("]", i + 1)
            if close < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : close].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = close
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


class PathPolicy:
    """Which paths may be opened: inside the roots, outside every forbidden tree."""

    def __init__(
        self,
        roots: Iterable[Path],
        forbidden: Iterable[Path],
        include: Iterable[str] = ("**",),
        exclude: Iterable[str] = (),
    ) -> None:
        # In path order (a folder as its name and a slash), each root once: one inside
        # another is walked as part of it.
        given = {Path(os.path.abspath(r)) for r in roots}
        kept = [
            r for r in given if not any(o != r and str(r).startswith(str(o) + "/") for o in given)
        ]
        self.roots = sorted(kept, key=lambda r: str(r) + ("/" if os.path.isdir(r) else ""))
        self.real_roots = [os.path.realpath(r) for r in self.roots]
        forb: set[str] = set()
        for f in (*ALWAYS_FORBIDDEN, *forbidden):
            forb.add(os.path.abspath(f))
            forb.add(os.path.realpath(f))
        for r, real in zip(self.roots, self.real_roots, strict=True):
            if os.path.isdir(real):  # a root's own keys folder is key material
                forb.add(os.path.join(str(r), "keys"))
                forb.add(os.path.join(real, "keys"))
        self.forbidden = sorted(forb)
        include = tuple(include)
        self._include = [glob_regex(p) for p in include]
        self._include_all = "**" in include
        self._exclude = [glob_regex(p) for p in exclude]

    @staticmethod
    def _under(path: str, tops: Iterable[str]) -> bool:
        return any(path == t or path.startswith(t.rstrip("/") + "/") for t in tops)

    def is_forbidden(self, path: str) -> bool:
        """Whether ``path`` (lexically or really) lies in a forbidden tree."""
        if "/." in path or "//" in path or not path.startswith("/"):
            path = os.path.abspath(path)
        return self._under(path, self.forbidden)

    def in_roots(self, real: str) -> bool:
        """Whether a real path lies inside a configured root."""
        return self._under(real, self.real_roots)

    def check(self, path: str) -> str | None:
        """Why ``path`` may not be opened (``forbidden`` / ``outside-roots``), or None.

        The lexical path is checked first so that a forbidden tree is refused
        without even resolving links inside it.
        """
        if self.is_forbidden(path):
            return "forbidden"
        real = os.path.realpath(path)
        if self.is_forbidden(real):
            return "forbidden"
        if not self.in_roots(real):
            return "outside-roots"
        return None

    @staticmethod
    def _rel(path: str, root: str) -> str:
        if path.startswith(root + "/"):
            return path[len(root) + 1 :]
        return os.path.basename(path.rstrip("/"))

    def excluded(self, path: str, root: str) -> bool:
        """Whether the user's exclude globs drop ``path`` (absolute or root-relative)."""
        if not self._exclude:
            return False
        rel = self._rel(path, root)
        return any(rx.match(path) or rx.match(rel) for rx in self._exclude)

    def included(self, path: str, root: str) -> bool:
        """Whether the user's include globs keep ``path``."""
        if self._include_all:
            return True
        rel = self._rel(path, root)
        return any(rx.match(path) or rx.match(rel) for rx in self._include)


def suffix_of(name: str) -> str:
    """``os.path.splitext(name)[1]`` for a bare name, without its cost per call.

    From the last dot, unless only dots come before it (".pem" has no suffix).
    """
    dot = name.rfind(".")
    if dot <= 0 or not name[:dot].lstrip("."):
        return ""
    return name[dot:]


def classify_name(name: str) -> str | None:
    """``key-material`` or ``binary`` from a file name alone (such files are never opened)."""
    lower = name.lower()
    suffix = suffix_of(lower)
    if suffix in KEY_SUFFIXES or "private" in lower or lower.startswith("id_"):
        return "key-material"
    if suffix in BINARY_SUFFIXES:
        return "binary"
    return None


#: Decides, from a candidate's stat, whether its bytes are needed (else a cached digest is used).
Want = Callable[[Candidate], bool]


def walk(policy: PathPolicy, *, max_file: int, max_total: int, want: Want = lambda c: True) -> Walk:
    """Find every file under the roots, reading those ``want`` asks for (all kept in memory)."""
    out = Walk()
    for found in iter_walk(policy, max_file=max_file, max_total=max_total, want=want):
        if isinstance(found, Candidate):
            out.files.append(found)
        elif isinstance(found, Skipped):
            out.skipped.append(found)
        else:
            out.links[found.path] = found.target
    return out


def iter_walk(
    policy: PathPolicy, *, max_file: int, max_total: int, want: Want = lambda c: True
) -> Iterator[Found]:
    """Every file, skipped path and link under the roots, one at a time.

    A candidate's bytes (read when ``want`` asks for them) are the caller's to
    keep or drop: the walk holds nothing but the folders it is inside, so a
    tree of any size is walked in bounded memory.
    """
    return _Walker(policy, max_file, max_total, want).run()


def mount_points(mountinfo: str = "/proc/self/mountinfo") -> frozenset[str]:
    """Every mount point this process sees (empty when /proc is not there)."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return frozenset()
    out: set[str] = set()
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:
            # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
            out.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return frozenset(out)


def _identity(paths: Iterable[str]) -> frozenset[tuple[int, int]]:
    """(device, inode) of each path that exists; ``stat`` opens nothing."""
    out: set[tuple[int, int]] = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        out.add((st.st_dev, st.st_ino))
    return frozenset(out)


def _sort_key(e: os.DirEntry[str]) -> str:
    return e.name + "/" if e.is_dir(follow_symlinks=False) else e.name


def _shown_name(name: str) -> str | None:
    """``name`` when it is valid UTF-8, else None (it cannot be sent or stored as text)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return name


def _printable(name: str) -> str:
    """A name that is not UTF-8, with its odd bytes written as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class _Walker:
    """One walk of the roots (the state a walk carries from folder to folder)."""

    def __init__(self, policy: PathPolicy, max_file: int, max_total: int, want: Want) -> None:
        self.policy = policy
        self.max_file = max_file
        self.max_total = max_total
        self.want = want
        self.total = 0
        # An entry of a folder that is itself outside every forbidden tree lies in
        # one only if it *is* a forbidden path (one that starts deeper is met when
        # the walk gets there), so the check per entry is a set lookup, on the
        # path as shown and on its real location. Paths in policy.forbidden are
        # absolute and normalised, as are those the walk builds.
        self.forbidden_set = frozenset(policy.forbidden)
        self.forbidden_ids = _identity(policy.forbidden)
        self.mounts = mount_points()
        self.root_dev = 0

    def run(self) -> Iterator[Found]:
        """Walk every root in turn."""
        policy = self.policy
        for root, real_root in zip(policy.roots, policy.real_roots, strict=True):
            root_s = str(root)
            if policy.is_forbidden(root_s) or policy.is_forbidden(real_root):
                yield Skipped(root_s, "forbidden", "the root is a forbidden tree")
                continue
            try:
                st = os.stat(root_s)
            except FileNotFoundError:
                yield Skipped(root_s, "missing", "configured root does not exist")
                continue
            except OSError as exc:
                yield Skipped(root_s, "unreadable", exc.strerror or str(exc))
                continue
            if (st.st_dev, st.st_ino) in self.forbidden_ids:
                yield Skipped(
                    root_s, "forbidden", "the root is a forbidden tree under another name"
                )
                continue
            self.root_dev = st.st_dev
            if stat.S_ISDIR(st.st_mode):
                try:
                    dfd = os.open(root_s, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError as exc:
                    yield Skipped(root_s, "unreadable", exc.strerror or str(exc))
                    continue
                try:
                    yield from self.folder(dfd, root_s, real_root, root_s, 0, frozenset())
                finally:
                    os.close(dfd)
            else:
                parent, name = os.path.split(root_s)
                try:
                    dfd = os.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError as exc:
                    yield Skipped(root_s, "unreadable", exc.strerror or str(exc))
                    continue
                try:
                    real_parent = os.path.realpath(parent or "/")
                    real = os.path.join(real_parent, name)
                    # The parent folder was never checked: the full check, not the lookup.
                    if policy.is_forbidden(root_s) or policy.is_forbidden(real):
                        yield Skipped(root_s, "forbidden", "spool or key material: never opened")
                    else:
                        yield from self.entry(dfd, name, root_s, real, root_s, 0, frozenset())
                finally:
                    os.close(dfd)

    def folder(
        self,
        dfd: int,
        shown: str,
        real: str,
        root: str,
        depth: int,
        seen: frozenset[tuple[int, int]],
    ) -> Iterator[Found]:
        """Every entry of an allowed folder, in path order."""
        try:
            with os.scandir(dfd) as it:
                # A folder sorts as its name and a slash: the walk then meets paths in
                # the order of their full text (the state database's order as well).
                names = [n for _, n in sorted((_sort_key(e), e.name) for e in it)]
        except OSError as exc:
            yield Skipped(shown, "unreadable", exc.strerror or str(exc))
            return
        shown_dir = shown if shown.endswith("/") else shown + "/"
        real_dir = real if real.endswith("/") else real + "/"
        forbidden = self.forbidden_set
        for name in names:
            if _shown_name(name) is None:
                # Never opened: a name that is not UTF-8 cannot be sent as text, and a
                # configuration file does not have one.
                yield Skipped(shown_dir + _printable(name), "undecodable-name", "not UTF-8")
                continue
            child, real_child = shown_dir + name, real_dir + name
            if child in forbidden or real_child in forbidden:
                yield Skipped(child, "forbidden", "spool or key material: never opened")
                continue
            yield from self.entry(dfd, name, child, real_child, root, depth, seen)

    def entry(
        self,
        dfd: int,
        name: str,
        shown: str,
        real: str,
        root: str,
        depth: int,
        seen: frozenset[tuple[int, int]],
    ) -> Iterator[Found]:
        """One entry whose path the caller checked is outside every forbidden tree."""
        policy = self.policy
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as exc:
            yield Skipped(shown, "unreadable", exc.strerror or str(exc))
            return
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(name, dir_fd=dfd)
            except OSError as exc:
                yield Skipped(shown, "unreadable", exc.strerror or str(exc))
                return
            joined = os.path.normpath(os.path.join(os.path.dirname(real), target))
            why = policy.check(joined)
            if why is not None:
                yield Skipped(shown, why, f"symbolic link to {target}")
                return
            # Inside the roots: the target is sent where the walk finds it, not twice.
            yield Link(shown, os.path.realpath(joined))
            return
        mode = stat.S_IMODE(st.st_mode)
        if (st.st_dev, st.st_ino) in self.forbidden_ids:
            yield Skipped(shown, "forbidden", "the same file as a forbidden tree", None, mode)
            return
        if st.st_dev != self.root_dev or real in self.mounts:
            yield Skipped(shown, "mount-point", "another filesystem or a bind mount: not followed")
            return
        if stat.S_ISDIR(st.st_mode):
            yield from self.subfolder(dfd, name, st, shown, real, root, depth, seen)
            return
        if not stat.S_ISREG(st.st_mode):
            yield Skipped(shown, "not-regular", "device, pipe or socket", None, mode)
            return
        size = st.st_size
        if st.st_nlink > 1:
            yield Skipped(shown, "hard-link", _HARD_LINK % st.st_nlink, size, mode)
            return
        if policy.excluded(shown, root):
            yield Skipped(shown, "excluded", "matches an exclude glob", size, mode)
            return
        if not policy.included(shown, root):
            yield Skipped(shown, "not-included", "matches no include glob", size, mode)
            return
        by_name = classify_name(name)
        if by_name is not None:
            yield Skipped(shown, by_name, "by its name; never opened", size, mode)
            return
        if size > self.max_file:
            yield Skipped(
                shown, "too-large", f"{size} bytes > max_file {self.max_file}", size, mode
            )
            return
        if self.total + size > self.max_total:
            yield Skipped(shown, "total-cap", f"max_total {self.max_total} reached", size, mode)
            return
        self.total += size
        cand = Candidate(
            shown, real, root, size, mode, st.st_mtime_ns, st.st_ctime_ns, st.st_dev, st.st_ino
        )
        if self.want(cand):
            data = _read(dfd, name, st, self.max_file)
            if isinstance(data, Skipped):
                self.total -= size
                yield Skipped(shown, data.reason, data.detail, size, mode, after_read=True)
                return
            if b"\0" in data[:_BINARY_SNIFF]:
                self.total -= size
                yield Skipped(shown, "binary", "holds NUL bytes", size, mode, after_read=True)
                return
            cand.data = data
        yield cand

    def subfolder(
        self,
        dfd: int,
        name: str,
        st: os.stat_result,
        shown: str,
        real: str,
        root: str,
        depth: int,
        seen: frozenset[tuple[int, int]],
    ) -> Iterator[Found]:
        """Descend into a folder, opened without following links and checked to be the one seen."""
        if depth >= MAX_DEPTH or (st.st_dev, st.st_ino) in seen:
            yield Skipped(shown, "too-deep", "folder nesting or a loop")
            return
        if self.policy.excluded(shown + "/", root) or self.policy.excluded(shown, root):
            yield Skipped(shown, "excluded", "matches an exclude glob")
            return
        try:
            sub = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd
            )
        except OSError as exc:
            yield Skipped(shown, "unreadable", exc.strerror or str(exc))
            return
        try:
            sst = os.fstat(sub)
            if (sst.st_dev, sst.st_ino) != (st.st_dev, st.st_ino):
                yield Skipped(shown, "changed", "replaced while reading")
                return
            yield from self.folder(
                sub, shown, real, root, depth + 1, seen | {(st.st_dev, st.st_ino)}
            )
        finally:
            os.close(sub)


_HARD_LINK = (
    "%d names for one file: a hard link is another name for the same inode, which a "
    "path check cannot place; never opened"
)


def _read(dfd: int, name: str, st: os.stat_result, max_file: int) -> bytes | Skipped:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0)
    try:
        try:
            fd = os.open(name, flags, dir_fd=dfd)
        except PermissionError:
            # O_NOATIME needs ownership; retry without it.
            fd = os.open(name, flags & ~getattr(os, "O_NOATIME", 0), dir_fd=dfd)
    except OSError as exc:
        reason = "changed" if exc.errno == errno.ELOOP else "unreadable"
        return Skipped(name, reason, exc.strerror or str(exc))
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
            return Skipped(name, "changed", "replaced while reading")
        if fst.st_nlink > 1:  # linked between the lstat and the open: not one byte is read
            return Skipped(name, "hard-link", _HARD_LINK % fst.st_nlink)
        chunks: list[bytes] = []
        left = max_file + 1
        # First ask for the size lstat saw (plus one, to notice growth): os.read
        # allocates what is asked for, and a 1 MiB buffer per small file costs
        # more than reading it.
        ask = st.st_size + 1
        while left > 0:
            chunk = os.read(fd, min(left, ask))
            ask = 1 << 16
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_file:
            return Skipped(name, "too-large", "grew past max_file while reading")
        return data
    except OSError as exc:
        return Skipped(name, "unreadable", exc.strerror or str(exc))
    finally:
        os.close(fd)

"""extract_archive on real .tgz/.tar/.zip files, including hostile ones."""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from imgclf.archives import (
    ArchiveLimits,
    ArchiveTooLarge,
    UnsafeArchiveError,
    archive_format,
    extract_archive,
)
from imgclf.fileio import sha256_file
from tests.helpers import make_class_tree


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def flowers(tmp_path) -> Path:
    """A miniature flower_photos/: class folders plus the top-level LICENSE.txt."""
    root = make_class_tree(tmp_path / "src" / "flower_photos", {"daisy": 3, "roses": 2})
    (root / "LICENSE.txt").write_text("CC-BY 2.0\n")
    return root


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode="w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"data") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize("suffix,mode", [(".tgz", "w:gz"), (".tar", "w"), (".tar.gz", "w:gz")])
def test_tar_round_trip(tmp_path, flowers, suffix, mode):
    archive = tmp_path / f"flower_photos{suffix}"
    with tarfile.open(archive, mode) as tar:
        tar.add(flowers, arcname="flower_photos")
    before = sha256_file(archive)
    target = tmp_path / "out" / "x"
    assert extract_archive(archive, target) == target
    assert _tree_bytes(target / "flower_photos") == _tree_bytes(flowers)
    assert sha256_file(archive) == before  # only read
    assert [p.name for p in target.parent.iterdir()] == ["x"]  # no temporary left over


def test_zip_round_trip(tmp_path, flowers):
    archive = tmp_path / "flower_photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(flowers.rglob("*")):
            zf.write(p, "flower_photos/" + p.relative_to(flowers).as_posix())
    target = extract_archive(archive, tmp_path / "out")
    assert _tree_bytes(target / "flower_photos") == _tree_bytes(flowers)
    assert archive_format(archive) == "zip"


def test_empty_target_dir_is_accepted_populated_one_is_not(tmp_path, flowers):
    archive = tmp_path / "a.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(flowers, arcname="flower_photos")
    (tmp_path / "empty").mkdir()
    extract_archive(archive, tmp_path / "empty")
    with pytest.raises(FileExistsError, match="never overwrites"):
        extract_archive(archive, tmp_path / "empty")


def test_tree_left_by_a_killed_extraction_is_removed(tmp_path, flowers):
    archive = tmp_path / "a.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(flowers, arcname="flower_photos")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    corpse = tmp_path / "out" / f".x.{dead}.k1ll3d.tmp"
    (corpse / "flower_photos" / "daisy").mkdir(parents=True)
    alive = tmp_path / "out" / f".x.{os.getpid()}.busy.tmp"  # a parallel run, still working
    alive.mkdir()
    extract_archive(archive, tmp_path / "out" / "x")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [alive.name, "x"]


def _assert_nothing_written(tmp_path: Path, target: Path) -> None:
    assert not target.exists()
    leftovers = [p.name for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    assert not list(tmp_path.rglob("evil*"))


@pytest.mark.parametrize(
    "member,why",
    [
        (_file("../evil.txt"), "escapes the target"),
        (_file("flower_photos/../../evil.txt"), "escapes the target"),
        (_link("flower_photos/evil_link", "/etc/passwd", tarfile.SYMTYPE), "symbolic link"),
        (_link("flower_photos/evil_hard", "../../outside", tarfile.LNKTYPE), "hard link"),
        (_link("flower_photos/evil_dev", "", tarfile.CHRTYPE), "device"),
        (_link("flower_photos/evil_fifo", "", tarfile.FIFOTYPE), "device or FIFO"),
    ],
)
def test_unsafe_tar_members_are_refused(tmp_path, member, why):
    # Good members first: what was already extracted must vanish with the refusal.
    archive = _tar(
        tmp_path / "hostile.tgz",
        [_file("flower_photos/daisy/1.jpg"), _file("flower_photos/daisy/2.jpg"), member],
    )
    target = tmp_path / "deep" / "out"
    with pytest.raises(UnsafeArchiveError, match=why) as e:
        extract_archive(archive, target)
    assert member[0].name in str(e.value)
    _assert_nothing_written(tmp_path, target)


def test_absolute_tar_member_is_refused(tmp_path):
    outside = tmp_path / "evil_abs.txt"
    archive = _tar(tmp_path / "abs.tar", [_file(str(outside))], mode="w")
    with pytest.raises(UnsafeArchiveError, match="absolute path") as e:
        extract_archive(archive, tmp_path / "out")
    assert str(outside) in str(e.value)
    _assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    "name,why",
    [("../evil.txt", "escapes"), ("/evil_abs.txt", "absolute"), ("a\\..\\..\\evil", "escapes")],
)
def test_unsafe_zip_names_are_refused(tmp_path, name, why):
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("flower_photos/daisy/1.jpg", b"ok")
        zf.writestr(zipfile.ZipInfo(name), b"evil")
    with pytest.raises(UnsafeArchiveError, match=why):
        extract_archive(archive, tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_zip_symlink_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("flower_photos/evil_link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="'flower_photos/evil_link' is a symbolic link"):
        extract_archive(archive, tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_a_file_and_a_folder_of_one_name_are_refused_not_a_crash(tmp_path):
    # Either order, in a tar (checked as it streams) and a zip (checked before writing).
    for order, member, why in [
        (["daisy", "daisy/1.jpg", "roses/2.jpg"], "flower_photos/daisy/1.jpg",
         "is inside 'flower_photos/daisy', which the archive also holds as a file"),
        (["daisy/1.jpg", "roses/2.jpg", "daisy"], "flower_photos/daisy",
         "is a file where the archive also holds a folder of that name"),
    ]:  # fmt: skip
        names = [f"flower_photos/{name}" for name in order]
        zipped = tmp_path / "clash.zip"
        with zipfile.ZipFile(zipped, "w") as zf:
            for name in names:
                zf.writestr(name, b"data")
        for archive in (_tar(tmp_path / "clash.tgz", [_file(name) for name in names]), zipped):
            with pytest.raises(UnsafeArchiveError) as e:
                extract_archive(archive, tmp_path / "out")
            assert e.value.members == [member]
            assert f"member {member!r} {why}; nothing was extracted" in str(e.value)
            _assert_nothing_written(tmp_path, tmp_path / "out")


def test_names_too_long_for_a_file_system_are_shortened_not_a_crash(tmp_path, capsys):
    # 100 CJK characters: 300 bytes of UTF-8, a fine name on macOS, too long for Linux.
    long_stem = "花" * 100
    names = [f"flower_photos/daisy/{long_stem}.jpg", f"flower_photos/daisy/{long_stem}x.jpg",
             f"flower_photos/{long_stem}/1.jpg", "flower_photos/daisy/short.jpg"]  # fmt: skip
    zipped = tmp_path / "long.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for name in names:
            zf.writestr(name, name.encode())
    trees = []
    for archive in (_tar(tmp_path / "long.tgz", [_file(n, n.encode()) for n in names]), zipped):
        root = extract_archive(archive, tmp_path / f"{archive.name}.out")
        files = {p.relative_to(root).as_posix(): p.read_bytes().decode() for p in _files(root)}
        assert sorted(files.values()) == sorted(names)  # every photo kept, two apart
        assert all(len(part.encode()) <= 255 for f in files for part in f.split("/"))
        assert files["flower_photos/daisy/short.jpg"] == names[3]
        assert all(f.endswith(".jpg") for f in files)
        trees.append(files)
        err = capsys.readouterr().err
        assert f"extract {archive.name}: 3 member name(s) longer than 255 bytes" in err
    assert trees[0] == trees[1]  # the same names from a tar and a zip


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_the_same_tar_member_twice_is_no_clash_the_later_wins(tmp_path):
    members = [_file("flower_photos/daisy/1.jpg", b"first"), _file("flower_photos/daisy/1.jpg")]
    root = extract_archive(_tar(tmp_path / "twice.tgz", members), tmp_path / "out")
    assert (root / "flower_photos" / "daisy" / "1.jpg").read_bytes() == b"data"


def _patched_zip(path: Path, flowers: Path, *, encrypt: bool = False, method: int = 0) -> Path:
    """A zip of `flowers` whose headers then say "encrypted" or name another compression
    method (zipfile writes neither): what WinZip or Windows' Explorer (Deflate64) hand out."""
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(flowers.rglob("*.jpg")):
            zf.write(file, file.relative_to(flowers.parent).as_posix())
    data = bytearray(path.read_bytes())
    for magic, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(magic)
        while at >= 0:
            if encrypt:
                data[at + flags_at] |= 0x1
            if method:
                data[at + flags_at + 2 : at + flags_at + 4] = method.to_bytes(2, "little")
            at = data.find(magic, at + 4)
    path.write_bytes(bytes(data))
    return path


def test_a_zip_that_zipfile_cannot_read_is_refused_before_writing(tmp_path, flowers):
    n = len(list(flowers.rglob("*.jpg")))
    for name, patch, what in [
        ("locked.zip", {"encrypt": True}, f"{n} of its {n} files are password-protected"),
        ("deflate64.zip", {"method": 9}, f"{n} of its {n} files use a compression method"),
    ]:
        archive = _patched_zip(tmp_path / name, flowers, **patch)
        with pytest.raises(ValueError, match=rf"cannot extract .*{name}: {re.escape(what)}"):
            extract_archive(archive, tmp_path / "out")
        _assert_nothing_written(tmp_path, tmp_path / "out")


def test_not_an_archive_and_truncated_archive(tmp_path, flowers):
    text = tmp_path / "notes.tgz"
    text.write_text("not really an archive\n")
    with pytest.raises(ValueError, match=r"not a \.tgz/\.tar\.gz/\.tar/\.zip archive"):
        extract_archive(text, tmp_path / "out")

    archive = tmp_path / "full.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(flowers, arcname="flower_photos")
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ValueError, match="damaged or truncated"):
        extract_archive(cut, tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


# --------------------------------------------------------------------- size caps


class _Zeros(io.RawIOBase):
    """`size` zero bytes, streamed: a bomb member without holding it in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def _zip_bomb(path: Path, size: int) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("flower_photos/daisy/1.jpg", b"a small good member")
        with zf.open("flower_photos/daisy/zeros.jpg", "w", force_zip64=True) as out:
            shutil.copyfileobj(_Zeros(size), out, 1 << 20)
    return path


def _tar_bomb(path: Path, size: int) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [("flower_photos/daisy/1.jpg", b"a small good member")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("flower_photos/daisy/zeros.jpg")
        info.size = size
        tar.addfile(info, _Zeros(size))
    return path


@pytest.mark.parametrize("make", [_zip_bomb, _tar_bomb])
def test_an_expanding_archive_is_stopped_at_the_ratio_cap(tmp_path, make):
    archive = make(tmp_path / ("bomb.zip" if make is _zip_bomb else "bomb.tgz"), 64 << 20)
    assert archive.stat().st_size < 200_000  # 64 MiB of zeros in well under 1% of that
    target = tmp_path / "out"
    with pytest.raises(ArchiveTooLarge, match=r"ingest\.max_expansion_ratio=100 times") as e:
        extract_archive(archive, target)
    assert e.value.member == "flower_photos/daisy/zeros.jpg"
    assert "'flower_photos/daisy/zeros.jpg'" in str(e.value)
    _assert_nothing_written(tmp_path, target)
    # A cap on the total bytes stops it too, whatever the ratio.
    with pytest.raises(ArchiveTooLarge, match=r"ingest.max_extracted_bytes=1,000,000\b"):
        extract_archive(archive, target, ArchiveLimits(max_bytes=1_000_000, max_ratio=1e6))
    _assert_nothing_written(tmp_path, target)
    # Raised caps let the same archive through.
    extract_archive(archive, target, ArchiveLimits(max_bytes=1 << 30, max_ratio=1e6))
    assert (target / "flower_photos" / "daisy" / "zeros.jpg").stat().st_size == 64 << 20


def test_real_images_pass_the_default_caps(tmp_path, flowers):
    archive = tmp_path / "flower_photos.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(flowers, arcname="flower_photos")
    extract_archive(archive, tmp_path / "out")
    assert _tree_bytes(tmp_path / "out" / "flower_photos") == _tree_bytes(flowers)


def test_a_bomb_as_data_source_is_one_paragraph_and_leaves_no_extraction(tmp_path):
    from imgclf.config import cache_dir
    from imgclf.sources import SourceUnavailable, resolve_source

    archive = _zip_bomb(tmp_path / "bomb.zip", 32 << 20)
    with pytest.raises(SourceUnavailable, match="decompression bomb; the partial extraction was"):
        resolve_source(str(archive))
    extracted = cache_dir("extracted")
    assert not extracted.exists() or not any(extracted.iterdir())


def test_every_unsafe_member_is_named(tmp_path):
    members = [_file("flower_photos/daisy/1.jpg")]
    members += [_file(f"../evil_{i}.txt") for i in range(12)]
    members += [_link("flower_photos/evil_link", "/etc/passwd", tarfile.SYMTYPE)]
    archive = _tar(tmp_path / "hostile.tgz", members)
    with pytest.raises(UnsafeArchiveError, match="13 unsafe members") as e:
        extract_archive(archive, tmp_path / "out")
    message = str(e.value)
    assert "'../evil_0.txt' escapes" in message and "'../evil_9.txt' escapes" in message
    assert "and 3 more" in message  # ten named, the rest counted
    assert len(e.value.members) == 13 and e.value.members[-1] == "flower_photos/evil_link"
    _assert_nothing_written(tmp_path, tmp_path / "out")

    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("flower_photos/daisy/1.jpg", b"ok")
        zf.writestr(zipfile.ZipInfo("../a.txt"), b"evil")
        zf.writestr(zipfile.ZipInfo("/b.txt"), b"evil")
    with pytest.raises(UnsafeArchiveError, match=r"2 unsafe members: '\.\./a\.txt' escapes") as e:
        extract_archive(archive, tmp_path / "out")
    assert "'/b.txt' has an absolute path" in str(e.value)

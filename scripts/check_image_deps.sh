#!/usr/bin/env bash
# What the Docker image's two `pip install`s resolve to, checked without Docker.
#
# The image installs torch first, PyTorch's CUDA 12.6 build from PyTorch's index (the Dockerfile's
# `pip install --index-url https://download.pytorch.org/whl/cu126 torch==<pin>+cu126`, read from the Dockerfile),
# then `pip install -r requirements.txt` from PyPI, which keeps that torch (requirements.txt's torch==<pin> is met
# by <pin>+cu126). This script runs pip's resolver the same two ways for the image's platform (CPython 3.11, Linux
# x86_64, glibc 2.36 as in Debian bookworm), without installing anything:
#   1. torch alone against PyTorch's index (its dependencies from there too, as in the image);
#   2. requirements.txt against PyPI, in an empty environment holding what step 1 resolved as installed
#      distributions (their metadata only), as the image's second install finds them;
# then checks the two reports together:
#   - every pin in requirements.txt resolved to exactly that version (torch: to the Dockerfile's <pin>+cu126), and
#     step 2 kept step 1's torch;
#   - torch is the CUDA 12.6 build: its file name (+cu126) and index, torch/version.py, and the CUDA 12
#     packages it requires (cuda-toolkit 12.6.* and/or nvidia-*-cu12); no CUDA 13 package anywhere in the set;
#   - bitsandbytes' wheel ships the native library for that CUDA version (libbitsandbytes_cuda126.so);
#   - every requirement of every resolved distribution is met by the resolved set (no conflict);
#   - the total download size of the resolved set.
# Needs network access to download.pytorch.org, pypi.org and files.pythonhosted.org, and a pip >= 23.3 for step 2
# (platform options with --dry-run and no --target): an older one fetches pip's wheel from the index and runs that.
# pip's dry run still downloads the wheels it resolves (to a temporary directory; ~3 GB, one to two minutes on a
# fast link) where the index does not offer their metadata on its own; the bitsandbytes and torch file checks
# read only the zip directory and one member, by HTTP range requests.
#
# Usage: scripts/check_image_deps.sh    (PIP_PYTHON=... to use another interpreter's pip, INDEX_URL=... to resolve
#                                        requirements.txt against another index, TORCH_INDEX_URL=... torch against
#                                        another index than the Dockerfile's)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PIP_PYTHON:-$ROOT/.venv/bin/python}"
INDEX_URL="${INDEX_URL:-https://pypi.org/simple}"
REQUIREMENTS="$ROOT/requirements.txt"
DOCKERFILE="$ROOT/Dockerfile"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# The Dockerfile's torch install: the one `pip install` with an --index-url.
TORCH_RUN="$(grep -E '^[^#]*pip install .*--index-url' "$DOCKERFILE" || true)"
TORCH_REQ="$(grep -oE 'torch==[0-9][^[:space:]"\\]*' <<<"$TORCH_RUN" || true)"
DOCKER_TORCH_INDEX="$(grep -oE 'https?://[^[:space:]"\\]+' <<<"$TORCH_RUN" || true)"
if [ "$(wc -l <<<"$TORCH_REQ")" != 1 ] || [ -z "$TORCH_REQ" ] || [ -z "$DOCKER_TORCH_INDEX" ]; then
    echo "FAIL: no single 'pip install --index-url <index> torch==<version>' line in $DOCKERFILE" >&2
    exit 1
fi
TORCH_INDEX_URL="${TORCH_INDEX_URL:-$DOCKER_TORCH_INDEX}"

# The image's platform tags: what pip itself accepts on glibc 2.36 x86_64 (pip does not expand a
# single --platform manylinux_2_28_x86_64 to the older manylinux tags, e.g. tokenizers' manylinux_2_17).
PLATFORMS=()
for minor in $(seq 36 -1 5); do PLATFORMS+=(--platform "manylinux_2_${minor}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)
TARGET=(--only-binary=:all: "${PLATFORMS[@]}" --python-version 3.11 --implementation cp)

# Only the given indexes, as in `docker build`: no pip configuration files (PIP_CONFIG_FILE=/dev/null skips them
# all, e.g. a global constraint file or a local find-links / extra index) and no PIP_* variables from this shell
# except the TLS and timeout ones.
CLEAN_ENV=(env)
while IFS= read -r name; do
    case "$name" in
        PIP_CERT | PIP_CLIENT_CERT | PIP_DEFAULT_TIMEOUT | PIP_PROXY | PIP_RETRIES) ;;
        PIP_*) CLEAN_ENV+=(-u "$name") ;;
    esac
done < <(compgen -e)
CLEAN_ENV+=(PIP_CONFIG_FILE=/dev/null)

PIP=("$PY" -m pip)
if ! "$PY" -c 'import sys, pip; sys.exit(tuple(int(p) for p in pip.__version__.split(".")[:2]) < (23, 3))'; then
    "${CLEAN_ENV[@]}" "$PY" -m pip download --quiet --no-deps --only-binary=:all: --index-url "$INDEX_URL" \
        --dest "$WORK/pip" "pip>=23.3" >"$WORK/pip-download.log" 2>&1 || { cat "$WORK/pip-download.log" >&2; exit 1; }
    PIP=("$PY" "$(echo "$WORK"/pip/pip-*.whl)/pip")
fi
echo "pip: $("${PIP[@]}" --version | cut -d' ' -f1-2)"

# 1. torch alone, from PyTorch's index.
echo "resolving $TORCH_REQ for cp311 manylinux x86_64 against $TORCH_INDEX_URL"
if ! "${CLEAN_ENV[@]}" "${PIP[@]}" install --dry-run --ignore-installed "${TARGET[@]}" \
    --index-url "$TORCH_INDEX_URL" --target "$WORK/target" --report "$WORK/torch.json" \
    "$TORCH_REQ" >"$WORK/pip-torch.log" 2>&1; then
    tail -n 30 "$WORK/pip-torch.log" >&2
    echo "FAIL: pip could not resolve $TORCH_REQ from $TORCH_INDEX_URL for the image's platform" >&2
    exit 1
fi

# 2. requirements.txt from PyPI, with step 1's distributions installed: an empty virtualenv holding their metadata.
"$PY" -m venv --without-pip "$WORK/env"
SITE="$("$WORK/env/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
"$PY" - "$WORK/torch.json" "$SITE" <<'PY'
import json
import os
import sys

report, site = sys.argv[1:]
for item in json.load(open(report))["install"]:
    meta = item["metadata"]
    lines = [f"Metadata-Version: 2.1", f"Name: {meta['name']}", f"Version: {meta['version']}"]
    if meta.get("requires_python"):
        lines.append(f"Requires-Python: {meta['requires_python']}")
    lines += [f"Provides-Extra: {extra}" for extra in meta.get("provides_extra", [])]
    lines += [f"Requires-Dist: {req}" for req in meta.get("requires_dist", [])]
    info = os.path.join(site, f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(info, "INSTALLER"), "w") as f:
        f.write("pip\n")
PY
echo "resolving $REQUIREMENTS for cp311 manylinux x86_64 against $INDEX_URL, with step 1's set installed"
if ! "${CLEAN_ENV[@]}" "${PIP[@]}" --python "$WORK/env/bin/python" install --dry-run "${TARGET[@]}" \
    --index-url "$INDEX_URL" --report "$WORK/requirements.json" \
    -r "$REQUIREMENTS" >"$WORK/pip-requirements.log" 2>&1; then
    tail -n 30 "$WORK/pip-requirements.log" >&2
    echo "FAIL: pip could not resolve requirements.txt for the image's platform after $TORCH_REQ" >&2
    exit 1
fi

"$PY" - "$WORK/torch.json" "$WORK/requirements.json" "$REQUIREMENTS" "$TORCH_REQ" "$TORCH_INDEX_URL" <<'PY'
import io
import json
import re
import sys
import urllib.parse
import urllib.request
import zipfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

torch_report, requirements_report, requirements_path, torch_req, torch_index = sys.argv[1:]
step1 = {canonicalize_name(i["metadata"]["name"]): i for i in json.load(open(torch_report))["install"]}
step2 = {canonicalize_name(i["metadata"]["name"]): i for i in json.load(open(requirements_report))["install"]}
dists = {**step1, **step2}  # what the image holds: step 2 replaces what it upgrades
failures = []

# The image: python:3.11.16-slim-bookworm on x86_64.
IMAGE_ENV = {
    "implementation_name": "cpython", "implementation_version": "3.11.16", "os_name": "posix",
    "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
    "platform_system": "Linux", "platform_version": "", "python_full_version": "3.11.16",
    "python_version": "3.11", "sys_platform": "linux",
}


class HttpFile(io.RawIOBase):
    """A remote file read by HTTP range requests: zipfile reads a wheel's directory without the wheel."""

    def __init__(self, url):
        self.url, self.pos = url, 0
        self.size = int(urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60).headers["Content-Length"])

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=0):
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def readinto(self, buffer):
        if self.pos >= self.size or not len(buffer):
            return 0
        end = min(self.pos + len(buffer), self.size) - 1
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end}"})
        data = urllib.request.urlopen(request, timeout=60).read()
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def remote_wheel(url):
    return zipfile.ZipFile(io.BufferedReader(HttpFile(url), buffer_size=1 << 16))


def file_name(dist):
    return urllib.parse.unquote(dist["download_info"]["url"].rsplit("/", 1)[1])


def applies(req):
    return req.marker is None or req.marker.evaluate({**IMAGE_ENV, "extra": ""})


# The Dockerfile's torch: <pin>+cu<major><minor>.
want_torch = Requirement(torch_req)
want_version = str(want_torch.specifier).removeprefix("==")
local = Version(want_version).local or ""
if not re.fullmatch(r"cu\d{3,}", local):
    failures.append(f"the Dockerfile installs {torch_req}, not a CUDA build (+cuNNN)")
want_cuda = f"{local[2:-1]}.{local[-1]}" if local else "?"

# 1. Every pin resolved to exactly its version; torch to the Dockerfile's build of it, kept by step 2.
pins = {}
for line in open(requirements_path):
    line = line.split("#", 1)[0].strip()
    if line:
        req = Requirement(line)
        pins[canonicalize_name(req.name)] = str(req.specifier)
for name, spec in pins.items():
    got = dists.get(name, {}).get("metadata", {}).get("version")
    want = f"=={want_version}" if name == "torch" else spec
    if got is None or want != f"=={got}":
        failures.append(f"pin {name}{spec} resolved to {got}" + (f", not the Dockerfile's {want_version}" if name == "torch" else ""))
if pins.get("torch") != f"=={Version(want_version).public}":
    failures.append(f"requirements.txt pins torch{pins.get('torch')}, the Dockerfile installs {torch_req}")
if "torch" in step2:
    failures.append(f"pip install -r requirements.txt replaces torch {want_version} with {step2['torch']['metadata']['version']} from {step2['torch']['download_info']['url']}")
upgraded = sorted(f"{n} {step1[n]['metadata']['version']} -> {step2[n]['metadata']['version']}" for n in step1.keys() & step2.keys())

# 2. torch: PyTorch's CUDA build for cp311 x86_64 from its index, and the CUDA it brings.
torch = dists["torch"]
torch_file, torch_url = file_name(torch), torch["download_info"]["url"]
if not re.fullmatch(rf"torch-{re.escape(want_version)}-cp311-cp311-manylinux[\w.]*_x86_64\.whl", torch_file):
    failures.append(f"torch resolved to {torch_file}, not the manylinux x86_64 cp311 wheel of {want_version}")
if urllib.parse.urlsplit(torch_url).netloc != urllib.parse.urlsplit(torch_index).netloc:
    failures.append(f"torch comes from {torch_url}, not {torch_index}")
cuda_reqs = [r for r in torch["metadata"].get("requires_dist", []) if re.match(r"(cuda-|nvidia-)", r) and applies(Requirement(r))]
if not cuda_reqs:
    failures.append("torch requires no CUDA packages: not a CUDA build")
major = want_cuda.split(".")[0]
for text in cuda_reqs:
    req = Requirement(text)
    name, spec = canonicalize_name(req.name), str(req.specifier)
    suffix = re.search(r"-cu(\d+)$", name)
    if suffix and suffix.group(1) != major:
        failures.append(f"torch requires {text.split(';')[0].strip()}: CUDA {suffix.group(1)}, not {major}")
    if name == "cuda-toolkit" and not re.fullmatch(rf"==\s*{re.escape(want_cuda)}(\.[\d*]+)*", spec):
        failures.append(f"torch requires {text.split(';')[0].strip()}, not a CUDA {want_cuda} toolkit")
version_py = remote_wheel(torch_url).read("torch/version.py").decode()
torch_build = re.search(r"^__version__ = '(.+)'", version_py, re.M).group(1)
torch_cuda = re.search(r"^cuda: Optional\[str\] = (.+)$", version_py, re.M).group(1).strip("'")
if torch_build != want_version or torch_cuda != want_cuda:
    failures.append(f"torch/version.py says {torch_build}, CUDA {torch_cuda}: not {want_version}, CUDA {want_cuda}")
# No second CUDA stack: every nvidia-*-cuNN and cuda-toolkit of the set is torch's CUDA major and (toolkit) minor.
for name, dist in sorted(dists.items()):
    suffix = re.search(r"-cu(\d+)$", name)
    version = dist["metadata"]["version"]
    if (suffix and suffix.group(1) != major) or (name == "cuda-toolkit" and not version.startswith(f"{want_cuda}.")):
        failures.append(f"the set holds {name} {version}: not CUDA {want_cuda}")

# 3. bitsandbytes ships a native library for torch's CUDA (it loads libbitsandbytes_cuda<major><minor>.so).
bnb = dists["bitsandbytes"]
bnb_libs = sorted(n.rsplit("/", 1)[1] for n in remote_wheel(bnb["download_info"]["url"]).namelist() if re.search(r"libbitsandbytes_cuda\d+\.so$", n))
wanted = f"libbitsandbytes_cuda{torch_cuda.replace('.', '')}.so"
if wanted not in bnb_libs:
    failures.append(f"bitsandbytes {bnb['metadata']['version']} has no {wanted} for torch's CUDA {torch_cuda}: {bnb_libs}")

# 4. Every requirement of every resolved distribution (with the extras asked for) is met by the set.
extras = defaultdict(set)
conflicts, changed = set(), True
while changed:
    changed = False
    for name, dist in dists.items():
        for extra in [""] + sorted(extras[name]):
            for text in dist["metadata"].get("requires_dist", []):
                req = Requirement(text)
                if req.marker is not None and not req.marker.evaluate({**IMAGE_ENV, "extra": extra}):
                    continue
                dep = canonicalize_name(req.name)
                got = dists.get(dep, {}).get("metadata", {}).get("version")
                if got is None or not req.specifier.contains(got, prereleases=True):
                    conflicts.add(f"{name} requires {text.split(';')[0].strip()}, resolved {got}")
                if not set(req.extras) <= extras[dep]:
                    extras[dep] |= set(req.extras)
                    changed = True
failures += sorted(conflicts)

# 5. Download size (Content-Length of each resolved file).
def size(dist):
    request = urllib.request.Request(dist["download_info"]["url"], method="HEAD")
    return int(urllib.request.urlopen(request, timeout=60).headers["Content-Length"])

with ThreadPoolExecutor(16) as pool:
    sizes = dict(zip(dists, pool.map(size, dists.values())))
total = sum(sizes.values())
cuda_total = sum(s for n, s in sizes.items() if n.startswith(("nvidia-", "cuda-")) or n in ("torch", "triton"))

pins_off = sum(f.startswith("pin ") for f in failures)
print(f"resolved:        {len(dists)} distributions ({len(step1)} with torch from {torch_index}, {len(step2)} more from requirements.txt); pins exact: {len(pins) - pins_off} of {len(pins)}")
print(f"torch wheel:     {torch_file} ({torch_build}, torch.version.cuda {torch_cuda}), from {urllib.parse.urlsplit(torch_url).netloc}")
print("torch needs:     " + ", ".join(r.split(";")[0].strip() for r in cuda_reqs))
print(f"upgraded by -r:  {', '.join(upgraded) or 'nothing'}")
print(f"bitsandbytes:    {file_name(bnb)}: {', '.join(bnb_libs)}")
print(f"download size:   {total / 1e9:.2f} GB ({cuda_total / 1e9:.2f} GB torch, triton and the CUDA packages)")
print(f"conflicts:       {'none' if not conflicts else len(conflicts)}")
if failures:
    print("FAIL:\n  " + "\n  ".join(failures), file=sys.stderr)
    sys.exit(1)
print("OK")
PY

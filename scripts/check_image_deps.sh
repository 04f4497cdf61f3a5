#!/usr/bin/env bash
# What `pip install -r requirements.txt` resolves to inside the Docker image, checked without Docker.
#
# Runs pip's resolver for the image's platform (CPython 3.11, Linux x86_64, glibc 2.36 as in Debian
# bookworm) against PyPI only, without installing anything, then checks the report:
#   - every pin in requirements.txt resolved to exactly that version;
#   - torch is PyPI's CUDA wheel (not a local +cpu build): its file name, torch/version.py and the
#     CUDA packages it requires;
#   - bitsandbytes' wheel ships a native library for that CUDA version;
#   - every requirement of every resolved distribution is met by the resolved set (no conflict);
#   - the total download size of the resolved set.
# Needs network access to pypi.org and files.pythonhosted.org. pip's dry run still downloads the
# wheels it resolves (to a temporary directory; ~2.9 GB, one to two minutes on a fast link) where the index
# does not offer their metadata on its own; the bitsandbytes and torch file checks read only the zip
# directory and one member, by HTTP range requests.
#
# Usage: scripts/check_image_deps.sh            (PIP_PYTHON=... to use another interpreter's pip,
#                                                INDEX_URL=... to resolve against another index)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PIP_PYTHON:-$ROOT/.venv/bin/python}"
INDEX_URL="${INDEX_URL:-https://pypi.org/simple}"
REQUIREMENTS="$ROOT/requirements.txt"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# The image's platform tags: what pip itself accepts on glibc 2.36 x86_64 (pip does not expand a
# single --platform manylinux_2_28_x86_64 to the older manylinux tags, e.g. tokenizers' manylinux_2_17).
PLATFORMS=()
for minor in $(seq 36 -1 5); do PLATFORMS+=(--platform "manylinux_2_${minor}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)

# Only PyPI, as in `docker build`: no pip configuration files (PIP_CONFIG_FILE=/dev/null skips them all,
# e.g. a global constraint file or a local find-links / extra index) and no PIP_* variables from this
# shell except the TLS and timeout ones.
CLEAN_ENV=(env)
while IFS= read -r name; do
    case "$name" in
        PIP_CERT | PIP_CLIENT_CERT | PIP_DEFAULT_TIMEOUT | PIP_PROXY | PIP_RETRIES) ;;
        PIP_*) CLEAN_ENV+=(-u "$name") ;;
    esac
done < <(compgen -e)
CLEAN_ENV+=(PIP_CONFIG_FILE=/dev/null)

echo "resolving $REQUIREMENTS for cp311 manylinux x86_64 against $INDEX_URL (pip: $("$PY" -m pip --version | cut -d' ' -f1-2))"
if ! "${CLEAN_ENV[@]}" "$PY" -m pip install --dry-run --ignore-installed --only-binary=:all: \
    "${PLATFORMS[@]}" --python-version 3.11 --implementation cp \
    --index-url "$INDEX_URL" --target "$WORK/target" --report "$WORK/report.json" \
    -r "$REQUIREMENTS" >"$WORK/pip.log" 2>&1; then
    tail -n 30 "$WORK/pip.log" >&2
    echo "FAIL: pip could not resolve requirements.txt for the image's platform" >&2
    exit 1
fi

"$PY" - "$WORK/report.json" "$REQUIREMENTS" <<'PY'
import io
import json
import re
import sys
import urllib.request
import zipfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

report_path, requirements_path = sys.argv[1:]
report = json.load(open(report_path))
dists = {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}
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
    return dist["download_info"]["url"].rsplit("/", 1)[1]


# 1. Every pin resolved to exactly its version.
pins = {}
for line in open(requirements_path):
    line = line.split("#", 1)[0].strip()
    if line:
        req = Requirement(line)
        pins[canonicalize_name(req.name)] = str(req.specifier)
for name, spec in pins.items():
    got = dists.get(name, {}).get("metadata", {}).get("version")
    if got is None or spec != f"=={got}":
        failures.append(f"pin {name}{spec} resolved to {got}")

# 2. torch: PyPI's CUDA wheel for cp311 x86_64, and the CUDA it brings.
torch = dists["torch"]
torch_file, torch_url = file_name(torch), torch["download_info"]["url"]
if "+" in torch["metadata"]["version"] or not re.fullmatch(r"torch-[\d.]+-cp311-cp311-manylinux_2_\d+_x86_64\.whl", torch_file):
    failures.append(f"torch resolved to {torch_file}, not PyPI's manylinux x86_64 cp311 wheel")
if not torch_url.startswith("https://files.pythonhosted.org/"):
    failures.append(f"torch comes from {torch_url}, not PyPI")
cuda_reqs = [r for r in torch["metadata"].get("requires_dist", []) if re.match(r"(cuda-toolkit|nvidia-)", r)]
toolkit = next((r.split(";")[0].strip() for r in cuda_reqs if r.startswith("cuda-toolkit")), None)
if toolkit is None:
    failures.append("torch requires no cuda-toolkit: not a CUDA build")
version_py = remote_wheel(torch_url).read("torch/version.py").decode()
torch_build = re.search(r"^__version__ = '(.+)'", version_py, re.M).group(1)
torch_cuda = re.search(r"^cuda: Optional\[str\] = (.+)$", version_py, re.M).group(1).strip("'")

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
print(f"resolved:        {len(dists)} distributions; pins exact: {len(pins) - pins_off} of {len(pins)}")
print(f"torch wheel:     {torch_file} ({torch_build}, torch.version.cuda {torch_cuda})")
print(f"torch needs:     {toolkit}; " + ", ".join(r.split(";")[0].strip() for r in cuda_reqs if r.startswith("nvidia-")))
print(f"bitsandbytes:    {file_name(bnb)}: {', '.join(bnb_libs)}")
print(f"download size:   {total / 1e9:.2f} GB ({cuda_total / 1e9:.2f} GB torch, triton and the CUDA packages)")
print(f"conflicts:       {'none' if not conflicts else len(conflicts)}")
if failures:
    print("FAIL:\n  " + "\n  ".join(failures), file=sys.stderr)
    sys.exit(1)
print("OK")
PY

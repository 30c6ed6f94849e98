#!/usr/bin/env bash
# Build llama.cpp's llama-server (the peer ferrolm is benchmarked against) from the
# llama.cpp tree vendored in the llama-cpp-python==0.3.36 source distribution on PyPI.
#
# Usage: scripts/build_llama_server.sh DEST_DIR [JOBS]
#   DEST_DIR  where the llama.cpp source tree is put (created; must not already hold one
#             unless it is a previous run of this script, which is then reused)
#   JOBS      parallel compile jobs (default: 2)
# Result:   DEST_DIR/build/bin/llama-server
#
# Needs: python3 with pip (only to download the sdist from PyPI), cmake >= 3.14, a C/C++
# compiler (gcc/g++), make. On Debian/Ubuntu: apt-get install -y cmake build-essential.
# No network access is needed beyond PyPI: CURL/OpenSSL are off and the web UI is not
# downloaded (LLAMA_USE_PREBUILT_UI=OFF; the server then serves no web UI, the API is
# unaffected). The build uses -march=native (GGML_NATIVE=ON): rebuild on the machine that
# runs the benchmark. On 2 shared cores it took about 23 minutes. The libraries are shared
# (libllama.so, libggml*.so in build/bin, found via RPATH): keep build/bin together.
set -euo pipefail

VERSION=0.3.36
# llama-cpp-python 0.3.36's CHANGELOG: "update llama.cpp to ggml-org/llama.cpp@0c1e57098".
# The sdist has no git metadata, so this is passed in for `llama-server --version`.
LLAMA_COMMIT=0c1e57098
DEST=${1:?usage: $0 DEST_DIR [JOBS]}
JOBS=${2:-2}
PY=${PYTHON:-python3}

command -v cmake >/dev/null || { echo "cmake not found (apt-get install -y cmake)" >&2; exit 1; }
command -v c++ >/dev/null || command -v g++ >/dev/null || { echo "no C++ compiler (apt-get install -y build-essential)" >&2; exit 1; }

mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)

if [ ! -f "$DEST/CMakeLists.txt" ]; then
    TMP=$(mktemp -d)
    trap 'rm -rf "$TMP"' EXIT
    echo ">> downloading llama-cpp-python==$VERSION sdist"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: --dest "$TMP" "llama-cpp-python==$VERSION"
    SDIST=$(ls "$TMP"/llama_cpp_python-"$VERSION".tar.gz "$TMP"/llama-cpp-python-"$VERSION".tar.gz 2>/dev/null | head -n1 || true)
    [ -n "$SDIST" ] || SDIST=$(ls "$TMP"/*.tar.gz | head -n1)
    echo ">> unpacking $(basename "$SDIST")"
    tar -xzf "$SDIST" -C "$TMP"
    SRC=$(ls -d "$TMP"/*/vendor/llama.cpp | head -n1)
    [ -f "$SRC/CMakeLists.txt" ] || { echo "vendor/llama.cpp not found in the sdist" >&2; exit 1; }
    cp -a "$SRC/." "$DEST/"
    # (the vendored tree keeps a .git file pointing to the parent repository's modules,
    # which does not exist here: git then fails and the build info reads commit "unknown"
    # instead of picking up some enclosing repository's commit)
fi

cd "$DEST"
echo ">> configuring"
nice -n 10 cmake -B build \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_COMMIT="$LLAMA_COMMIT"
echo ">> building llama-server with $JOBS jobs"
nice -n 10 cmake --build build --target llama-server -j"$JOBS"

"$DEST/build/bin/llama-server" --version
echo ">> built $DEST/build/bin/llama-server"

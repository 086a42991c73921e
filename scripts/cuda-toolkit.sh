#!/usr/bin/env bash
# Sets up a CUDA toolkit from PyPI wheels so `cargo build --features cuda` works on a host
# without a GPU or a system CUDA install (CI, build machines), then prints the environment
# to use it. Usage:
#
#   eval "$(scripts/cuda-toolkit.sh)"        # installs on first use, then only prints
#   cargo build --release -p flotilla-cli --features cuda
#
# The toolkit is pinned to CUDA 13.0 because the GPU hosts we test on run driver 580
# (CUDA 13.0): PTX from a newer nvcc would not load there. Our own kernels ship SASS for
# sm_80 and sm_90 besides PTX, so they need no JIT at all.
#
# A host WITH a GPU and a system toolkit needs none of this: put its nvcc on PATH and set
# CUDA_COMPUTE_CAP (e.g. 90) if nvidia-smi cannot tell.
set -euo pipefail

CUDA_VERSION_PIN="13.0"
prefix="${FLOTILLA_CUDA_PREFIX:-$HOME/.cache/flotilla/cuda-$CUDA_VERSION_PIN}"
root="$prefix/toolkit"

say() { echo "cuda-toolkit: $*" >&2; }

if [[ ! -x "$root/bin/nvcc" || ! -e "$root/lib/libcuda.so" ]]; then
    say "installing the CUDA $CUDA_VERSION_PIN toolkit wheels into $prefix (about 1.2 GB)"
    rm -rf "$prefix"
    mkdir -p "$prefix"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$prefix/py" \
        "nvidia-cuda-nvcc==$CUDA_VERSION_PIN.*" "nvidia-cuda-crt==$CUDA_VERSION_PIN.*" \
        "nvidia-nvvm==$CUDA_VERSION_PIN.*" "nvidia-cuda-cccl==$CUDA_VERSION_PIN.*" \
        "nvidia-cuda-runtime==$CUDA_VERSION_PIN.*" "nvidia-cuda-nvrtc==$CUDA_VERSION_PIN.*" \
        "nvidia-cublas==$CUDA_VERSION_PIN.*" "nvidia-curand==10.4.*" >&2
    wheel="$prefix/py/nvidia/cu13"
    [[ -x "$wheel/bin/nvcc" ]] || { say "FAILED: the nvcc wheel has no $wheel/bin/nvcc"; exit 1; }
    mkdir -p "$root/lib"
    ln -s "$wheel/bin" "$root/bin"
    ln -s "$wheel/include" "$root/include"
    ln -s "$wheel/nvvm" "$root/nvvm"
    # The wheels ship only versioned sonames; the linker wants the plain names.
    for f in "$wheel"/lib/lib*.so.*; do
        base="$(basename "$f")"
        ln -sf "$f" "$root/lib/$base"
        ln -sf "$f" "$root/lib/${base%%.so.*}.so"
    done
    for f in "$wheel"/lib/*.a; do ln -sf "$f" "$root/lib/"; done
    # No wheel carries libcuda (it comes with the driver). Link against a stub exporting the
    # driver entry points cudarc declares, each failing with CUDA_ERROR_NO_DEVICE (100); at
    # run time the real driver's libcuda.so.1 is loaded instead (same soname).
    cudarc_sys="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -1 || true)"
    if [[ -z "$cudarc_sys" ]]; then
        say "fetching crates to find the driver symbols cudarc uses"
        (cd "$(dirname "$0")/.." && cargo fetch --quiet >&2)
        cudarc_sys="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)"
    fi
    grep -oE '^ *fn cu[A-Za-z0-9_]+\(' "$cudarc_sys" | sed 's/ *fn //; s/($//' | sort -u |
        awk '{ print "int " $1 "(void) { return 100; }" }' >"$prefix/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/libcuda.so" "$prefix/libcuda_stub.c"
    "$root/bin/nvcc" --version | tail -2 >&2
fi

cat <<EOF
export CUDA_HOME="$root"
export CUDA_ROOT="$root"
export CUDA_PATH="$root"
export PATH="$root/bin:\$PATH"
export LIBRARY_PATH="$root/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION="13000"
EOF

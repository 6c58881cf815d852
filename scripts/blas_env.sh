# Source me. MLX's Linux CPU wheel (mlx-cpu) links the reference BLAS, ~1.5 GFLOP/s on this kind
# of machine; preloading OpenBLAS (Debian: libopenblas0-pthread) makes its matmuls ~20x faster
# and makes batched rows nearly free, as on an Apple GPU. Same results up to float rounding.
# Opt out with QPONDER_NO_OPENBLAS=1. macOS uses Accelerate/Metal and needs nothing.
if [ "$(uname -s)" = Linux ] && [ -z "${QPONDER_NO_OPENBLAS:-}" ]; then
  for _lib in /usr/lib/"$(uname -m)"-linux-gnu/openblas-pthread/libopenblas.so.0 \
              /usr/lib/"$(uname -m)"-linux-gnu/libopenblas.so.0; do
    if [ -e "$_lib" ]; then
      case ":${LD_PRELOAD:-}:" in *":$_lib:"*) ;; *) export LD_PRELOAD="$_lib${LD_PRELOAD:+:$LD_PRELOAD}" ;; esac
      break
    fi
  done
  unset _lib
fi

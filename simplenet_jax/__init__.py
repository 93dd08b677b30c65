"""SimpleNet (Liu et al., CVPR 2023) in JAX/Flax."""

import importlib.util as _ilu
import os as _os


def _cpu_xla_flags() -> None:
  """Turns off XLA:CPU's experimental YNN fusion before jax starts.

  Measured on a 2-core x86 CPU (README): WRN50-2 convolutions ran about 18%
  faster and compiled twice as fast without it. Only for CPU-only installs
  (an accelerator plugin's own XLA may reject CPU flags) and only when the
  user has not chosen; SIMPLENET_KEEP_XLA_FLAGS=1 leaves XLA_FLAGS alone.
  """
  if _os.environ.get('SIMPLENET_KEEP_XLA_FLAGS'):
    return
  flags = _os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_experimental_ynn_fusion_type' in flags:
    return
  for plugin in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                 'libtpu', 'jax_plugins'):
    if _ilu.find_spec(plugin) is not None:
      return
  _os.environ['XLA_FLAGS'] = (
      flags + ' --xla_cpu_experimental_ynn_fusion_type=').strip()


_cpu_xla_flags()

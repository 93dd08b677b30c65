"""A jitted JAX function -> an ONNX graph, for the primitives our models use.

Why not jax2onnx (measured with 0.17.1, jax 0.10.2, on Lite0 at 64 px):
its releases since 0.13 pin orbax-checkpoint < 0.11.37, which this project's
orbax-checkpoint >= 0.12.8 cannot satisfy (pip cannot install both); it
patches flax's `max_pool` in a way that fails on the positional window shape
our ResNets pass; converting Lite0's 2,234 equations took 243 s; and its graph
held 1,064 Concat and 531 Expand nodes whose shape annotations ONNX Runtime
warns about on every load. The functions exported here are a few hundred
equations of about thirty primitives, so they are translated directly from
the jaxpr, in seconds, into a plain graph (Conv, MatMul, Einsum, GatherND,
elementwise ops).

How:
  * The function is traced once with a symbolic batch dimension
    (`jax.export.symbolic_shape`); any shape that depends on it becomes a
    small shape computation on the input's runtime shape, so one graph
    serves every batch size.
  * Equations whose inputs are all constants are evaluated here (BatchNorm's
    rsqrt(var + eps) * scale, index arithmetic), unless that would store a
    much larger array than its inputs.
  * `broadcast_in_dim` is kept un-expanded while only elementwise ops consume
    it (ONNX broadcasts), so a bias add does not materialise a batch-sized
    tensor.
  * JAX's NHWC convolutions and max-pooling become NCHW ONNX ops between two
    Transposes; ONNX Runtime's transpose optimiser removes the pairs.

An unsupported primitive raises NotImplementedError naming it.
"""

from typing import Any, Callable, Sequence

import jax
import jax.extend.core as jex_core
import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper
from onnx import TensorProto

OPSET = 17
# Constant folding may grow an array up to this many elements (index tables
# of small models); larger results are computed by the graph at load time.
_FOLD_MAX_GROWTH = 1 << 16
_INT64_MAX = np.iinfo(np.int64).max

_BINARY = {'add': 'Add', 'sub': 'Sub', 'mul': 'Mul', 'div': 'Div',
           'max': 'Max', 'min': 'Min', 'pow': 'Pow', 'and': 'And',
           'or': 'Or', 'eq': 'Equal', 'lt': 'Less', 'le': 'LessOrEqual',
           'gt': 'Greater', 'ge': 'GreaterOrEqual'}
_UNARY = {'neg': 'Neg', 'exp': 'Exp', 'log': 'Log', 'sqrt': 'Sqrt',
          'abs': 'Abs', 'tanh': 'Tanh', 'logistic': 'Sigmoid', 'sign': 'Sign',
          'floor': 'Floor', 'ceil': 'Ceil', 'not': 'Not', 'erf': 'Erf'}
_IDENTITY = ('copy', 'copy_p', 'sharding_constraint', 'optimization_barrier')
_INLINE = {'pjit': 'jaxpr', 'jit': 'jaxpr', 'closed_call': 'call_jaxpr',
           'core_call': 'call_jaxpr', 'custom_jvp_call': 'call_jaxpr',
           'custom_vjp_call': 'call_jaxpr', 'remat': 'jaxpr',
           'checkpoint': 'jaxpr'}
# Primitives whose output shape is the broadcast of their inputs' shapes.
_ELEMENTWISE = (set(_BINARY) | set(_UNARY) |
                {'ne', 'rsqrt', 'square', 'integer_pow', 'select_n',
                 'convert_element_type', 'clamp'} | set(_IDENTITY))


def onnx_dtype(dtype) -> int:
  return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class _Lazy:
  """A graph value whose shape may still lack broadcast dimensions.

  `shape` is what the ONNX value has (ints or symbolic dims); it broadcasts
  to the jaxpr variable's shape. Constants are numpy arrays, not _Lazy.
  """

  def __init__(self, name: str, shape: Sequence[Any]):
    self.name, self.shape = name, tuple(shape)


class _PendingConv:
  """A convolution not yet emitted, so that the per-channel affine ops that
  follow it (BatchNorm with running statistics: subtract, multiply, add)
  fold into its weights and bias: one Conv node that ONNX Runtime can fuse
  with the activation after it, instead of three passes over the output.
  """

  def __init__(self, x: str, w: np.ndarray, bias, attrs: dict, back,
               shape, channel_axis: int):
    self.x, self.w, self.bias, self.attrs = x, w, bias, attrs
    self.back, self.shape, self.channel_axis = back, tuple(shape), channel_axis
    self.emitted = None

  def per_channel(self, c: np.ndarray):
    """`c` as one value per output channel, or None if it varies otherwise."""
    c = np.asarray(c)
    if c.dtype != np.float32 or c.ndim > len(self.shape):
      return None
    c = c.reshape((1,) * (len(self.shape) - c.ndim) + c.shape)
    if any(n != 1 for i, n in enumerate(c.shape) if i != self.channel_axis):
      return None
    out = self.w.shape[0]
    return np.broadcast_to(c.reshape(-1), (out,)).astype(np.float64)

  def fold(self, op: str, v: np.ndarray) -> '_PendingConv':
    w = self.w.astype(np.float64)
    b = (np.zeros(w.shape[0]) if self.bias is None else
         self.bias.astype(np.float64))
    if op == 'mul':
      w, b = w * v[:, None, None, None], b * v
    elif op == 'div':
      w, b = w / v[:, None, None, None], b / v
    elif op == 'add':
      b = b + v
    else:  # sub: conv - v.
      b = b - v
    return _PendingConv(self.x, w.astype(np.float32), b.astype(np.float32),
                        self.attrs, self.back, self.shape, self.channel_axis)


class _Builder:
  """Translates one jaxpr into ONNX nodes and initializers."""

  def __init__(self, opset: int):
    self.opset = opset
    self.nodes, self.inits = [], []
    self._count = 0
    self._const_names = {}
    self._dim_names = {}
    self._dim_vars = {}  # Symbol -> (input name, axis).

  # ---- names, constants, dims ---------------------------------------------

  def fresh(self, hint: str) -> str:
    self._count += 1
    return f'{hint}_{self._count}'

  def node(self, op: str, inputs: Sequence[str], hint: str | None = None,
           **attrs) -> str:
    out = self.fresh(hint or op.lower())
    self.nodes.append(helper.make_node(op, list(inputs), [out],
                                       name=self.fresh('n_' + op), **attrs))
    return out

  def const(self, value) -> str:
    a = np.asarray(value)
    if a.dtype == np.float64:  # jax would have made it float32 (x64 off).
      a = a.astype(np.float32)
    small = a.size <= 16
    key = (a.dtype.str, a.shape, a.tobytes()) if small else id(value)
    if key in self._const_names:
      return self._const_names[key][0]
    name = self.fresh('const')
    self.inits.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
    # Keep `value` alive so that its id is not reused for another array.
    self._const_names[key] = (name, value)
    return name

  def bind_dim_var(self, symbol: str, input_name: str, axis: int) -> None:
    self._dim_vars.setdefault(symbol, (input_name, axis))

  def dim(self, d) -> str:
    """An int64 (1,) tensor holding dimension `d` (an int or a DimExpr)."""
    if isinstance(d, (int, np.integer)):
      return self.const(np.array([int(d)], np.int64))
    key = str(d)
    if key in self._dim_names:
      return self._dim_names[key]
    symbols = sorted(d.get_vars())
    if len(symbols) != 1:
      raise NotImplementedError(f'shape {d} depends on {len(symbols)} '
                                'symbols; only one is supported')
    (s,) = symbols
    # Linear in the symbol (checked): a * s + c.
    c = int(d._evaluate({s: 0}))  # pylint: disable=protected-access
    a = int(d._evaluate({s: 1})) - c  # pylint: disable=protected-access
    if int(d._evaluate({s: 7})) != 7 * a + c:  # pylint: disable=protected-access
      raise NotImplementedError(f'shape {d} is not linear in {s}')
    src, axis = self._dim_vars[s]
    base = self._dim_names.get(s)
    if base is None:
      shape = self.node('Shape', [src], 'shape')
      base = self.node('Slice', [shape, self.const(np.array([axis], np.int64)),
                                 self.const(np.array([axis + 1], np.int64))],
                       s)
      self._dim_names[s] = base
    out = base
    if a != 1:
      out = self.node('Mul', [out, self.const(np.array([a], np.int64))])
    if c:
      out = self.node('Add', [out, self.const(np.array([c], np.int64))])
    self._dim_names[key] = out
    return out

  def shape_tensor(self, shape) -> str:
    if all(isinstance(d, (int, np.integer)) for d in shape):
      return self.const(np.array([int(d) for d in shape], np.int64))
    return self.node('Concat', [self.dim(d) for d in shape], 'shape', axis=0)

  # ---- values ---------------------------------------------------------------

  def realize(self, value):
    """Emits a pending convolution; other values are returned as they are."""
    if not isinstance(value, _PendingConv):
      return value
    if value.emitted is None:
      inputs = [value.x, self.const(value.w)]
      if value.bias is not None:
        inputs.append(self.const(value.bias))
      y = self.node('Conv', inputs, **value.attrs)
      value.emitted = _Lazy(self.node('Transpose', [y], perm=value.back),
                            value.shape)
    return value.emitted

  def name_of(self, value) -> str:
    """The ONNX name of a value as it is (possibly not yet broadcast)."""
    value = self.realize(value)
    if isinstance(value, _Lazy):
      return value.name
    return self.const(value)

  def full(self, value, aval) -> str:
    """The ONNX name of `value` expanded to the jaxpr shape `aval.shape`."""
    value = self.realize(value)
    if not isinstance(value, _Lazy):
      a = np.asarray(value)
      if a.shape == tuple(aval.shape):
        return self.const(a)
      value = _Lazy(self.const(a), a.shape)
    if _same_shape(value.shape, aval.shape):
      return value.name
    name = value.name
    if len(value.shape) < len(aval.shape):
      lead = len(aval.shape) - len(value.shape)
      name = self.node('Unsqueeze', [name, self.const(
          np.arange(lead, dtype=np.int64))])
    return self.node('Expand', [name, self.shape_tensor(aval.shape)], 'expand')


def _is_int(d) -> bool:
  return isinstance(d, (int, np.integer))


def _same_dim(a, b) -> bool:
  if _is_int(a) != _is_int(b):
    return False
  return int(a) == int(b) if _is_int(a) else str(a) == str(b)


def _same_shape(a, b) -> bool:
  return len(a) == len(b) and all(_same_dim(x, y) for x, y in zip(a, b))


def _broadcast_shapes(shapes):
  rank = max(len(s) for s in shapes)
  out = []
  for i in range(rank):
    dims = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
    big = [d for d in dims if not (_is_int(d) and int(d) == 1)]
    out.append(big[0] if big else 1)
  return tuple(out)


def _concrete(aval) -> bool:
  return all(_is_int(d) for d in aval.shape)


class _Lowering:
  """Walks a closed jaxpr, emitting ONNX through a _Builder."""

  def __init__(self, builder: _Builder):
    self.b = builder
    self.uses = {}

  def run(self, jaxpr, consts, args):
    env = {}
    for eqn in jaxpr.eqns:
      for v in eqn.invars:
        if not isinstance(v, jex_core.Literal):
          self.uses[v] = self.uses.get(v, 0) + 1
    for v in jaxpr.outvars:
      if not isinstance(v, jex_core.Literal):
        self.uses[v] = self.uses.get(v, 0) + 2  # Never folded away.

    def read(v):
      if isinstance(v, jex_core.Literal):
        return np.asarray(v.val, dtype=v.aval.dtype)
      return env[v]

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = np.asarray(c)
    for v, a in zip(jaxpr.invars, args):
      env[v] = a
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      outs = self.eqn(eqn, ins)
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn, ins):
    name = eqn.primitive.name
    if name in _INLINE:
      sub = eqn.params.get(_INLINE[name]) or eqn.params.get('fun_jaxpr')
      if isinstance(sub, jex_core.ClosedJaxpr):
        return self.run(sub.jaxpr, sub.consts, ins)
      return self.run(sub, [], ins)
    folded = self._fold_into_conv(eqn, ins)
    if folded is not None:
      return [folded]
    ins = [self.b.realize(x) for x in ins]
    if all(not isinstance(x, _Lazy) for x in ins) and self._foldable(eqn, ins):
      args = [jax.numpy.asarray(np.broadcast_to(x, v.aval.shape))
              for x, v in zip(ins, eqn.invars)]
      outs = eqn.primitive.bind(*args, **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
      return [np.asarray(o) for o in outs]
    handler = getattr(self, '_' + name, None)
    if name in _IDENTITY:
      return [ins[0]]
    if name in _BINARY:
      return [self._elementwise(eqn, _BINARY[name], ins)]
    if name in _UNARY:
      return [self._elementwise(eqn, _UNARY[name], ins)]
    if handler is None:
      raise NotImplementedError(
          f'ONNX export: the JAX primitive {name!r} is not supported '
          f'(simplenet_jax/onnx_lowering.py)')
    out = handler(eqn, ins)
    return out if isinstance(out, list) else [out]

  def _fold_into_conv(self, eqn, ins):
    """conv (+-*/) per-channel constant -> the conv with new weights, when
    the conv's output has no other use."""
    name = eqn.primitive.name
    if name not in ('add', 'sub', 'mul', 'div') or len(ins) != 2:
      return None
    for i in (0, 1):
      conv, other = ins[i], ins[1 - i]
      if (not isinstance(conv, _PendingConv) or isinstance(other, _Lazy) or
          isinstance(other, _PendingConv) or
          self.uses.get(eqn.invars[i], 0) != 1 or
          (i == 1 and name in ('sub', 'div'))):
        continue
      v = conv.per_channel(other)
      if v is not None and (name != 'div' or np.all(v != 0)):
        return conv.fold(name, v)
    return None

  def _foldable(self, eqn, ins) -> bool:
    if not all(_concrete(v.aval) for v in eqn.outvars + eqn.invars):
      return False
    biggest = max([np.asarray(x).size for x in ins] + [1])
    size = sum(int(np.prod(v.aval.shape)) for v in eqn.outvars)
    return size <= max(biggest, _FOLD_MAX_GROWTH)

  def full(self, x, var) -> str:
    return self.b.full(x, var.aval)

  @staticmethod
  def cval(x, var) -> np.ndarray:
    """A constant at its jaxpr shape (constants may be kept broadcastable)."""
    return np.broadcast_to(np.asarray(x), var.aval.shape)

  # ---- elementwise ------------------------------------------------------------

  def _shape_of(self, x, var_aval=None):
    if isinstance(x, _Lazy):
      return x.shape
    return np.asarray(x).shape

  def _elementwise(self, eqn, op, ins, names=None):
    if op in ('Max', 'Min') and len(ins) == 2:
      clipped = self._clip(eqn, op, ins)
      if clipped is not None:
        return clipped
    names = names or [self.b.name_of(x) for x in ins]
    out = self.b.node(op, names)
    return self._lazy_result(eqn, ins, out)

  def _clip(self, eqn, op, ins):
    """max(x, c) / min(x, c) with a constant c: Relu or Clip, which ONNX
    Runtime fuses into the convolution before it."""
    for x, c in (ins, ins[::-1]):
      if not isinstance(x, _Lazy) or isinstance(c, _Lazy):
        continue
      c = np.asarray(c)
      if c.size == 0 or np.any(c != c.flat[0]) or c.dtype != np.float32:
        continue
      if not _same_shape(_broadcast_shapes([x.shape, c.shape]), x.shape):
        continue
      if op == 'Max' and c.flat[0] == 0:
        out = self.b.node('Relu', [x.name])
      else:
        bound = self.b.const(np.array(c.flat[0], np.float32))
        out = self.b.node('Clip', [x.name, bound] if op == 'Max' else
                          [x.name, '', bound])
      return self._lazy_result(eqn, [x], out)
    return None

  def _lazy_result(self, eqn, ins, out_name):
    shape = _broadcast_shapes([self._shape_of(x) for x in ins])
    full = eqn.outvars[0].aval.shape
    if len(shape) < len(full):
      shape = (1,) * (len(full) - len(shape)) + tuple(shape)
    return _Lazy(out_name, shape)

  def _ne(self, eqn, ins):
    eq = self.b.node('Equal', [self.b.name_of(x) for x in ins])
    return self._lazy_result(eqn, ins, self.b.node('Not', [eq]))

  def _rsqrt(self, eqn, ins):
    s = self.b.node('Sqrt', [self.b.name_of(ins[0])])
    return self._lazy_result(eqn, ins, self.b.node('Reciprocal', [s]))

  def _square(self, eqn, ins):
    x = self.b.name_of(ins[0])
    return self._lazy_result(eqn, ins, self.b.node('Mul', [x, x]))

  def _integer_pow(self, eqn, ins):
    y = int(eqn.params['y'])
    x = self.b.name_of(ins[0])
    if y == 2:
      out = self.b.node('Mul', [x, x])
    else:
      dtype = eqn.outvars[0].aval.dtype
      out = self.b.node('Pow', [x, self.b.const(np.array(y, dtype))])
    return self._lazy_result(eqn, ins, out)

  def _select_n(self, eqn, ins):
    pred, cases = ins[0], ins[1:]
    if len(cases) != 2:
      raise NotImplementedError('ONNX export: select_n with more than two '
                                'cases is not supported')
    p = self.b.name_of(pred)
    if np.dtype(eqn.invars[0].aval.dtype) != np.bool_:
      p = self.b.node('Cast', [p], to=TensorProto.BOOL)
    out = self.b.node('Where', [p, self.b.name_of(cases[1]),
                                self.b.name_of(cases[0])])
    return self._lazy_result(eqn, ins, out)

  def _convert_element_type(self, eqn, ins):
    dtype = eqn.params['new_dtype']
    if np.dtype(dtype) == np.dtype(eqn.invars[0].aval.dtype):
      return ins[0]
    out = self.b.node('Cast', [self.b.name_of(ins[0])], to=onnx_dtype(dtype))
    return self._lazy_result(eqn, ins, out)

  def _clamp(self, eqn, ins):
    lo, x, hi = (self.b.name_of(v) for v in ins)
    out = self.b.node('Max', [self.b.node('Min', [x, hi]), lo])
    return self._lazy_result(eqn, ins, out)

  # ---- shapes -----------------------------------------------------------------

  def _broadcast_in_dim(self, eqn, ins):
    x = ins[0]
    shape = eqn.params['shape']
    dims = tuple(eqn.params['broadcast_dimensions'])
    src_shape = self._shape_of(x)
    missing = [i for i in range(len(shape)) if i not in dims]
    actual = [1] * len(shape)
    for i, d in enumerate(dims):
      actual[d] = src_shape[i]
    if not isinstance(x, _Lazy):
      # A constant stays one, of a shape that broadcasts to `shape`.
      return np.asarray(x).reshape([int(d) for d in actual])
    name = x.name
    if missing:
      name = self.b.node('Unsqueeze', [name, self.b.const(
          np.array(missing, np.int64))])
    return _Lazy(name, actual)

  def _reshape(self, eqn, ins):
    if eqn.params.get('dimensions') is not None:
      raise NotImplementedError('ONNX export: reshape with dimensions')
    x = self.full(ins[0], eqn.invars[0])
    return _Lazy(self.b.node('Reshape', [x, self.b.shape_tensor(
        eqn.params['new_sizes'])]), eqn.params['new_sizes'])

  def _squeeze(self, eqn, ins):
    x = self.full(ins[0], eqn.invars[0])
    axes = np.array(eqn.params['dimensions'], np.int64)
    return _Lazy(self.b.node('Squeeze', [x, self.b.const(axes)]),
                 eqn.outvars[0].aval.shape)

  def _expand_dims(self, eqn, ins):
    x = self.full(ins[0], eqn.invars[0])
    axes = np.array(eqn.params['dimensions'], np.int64)
    return _Lazy(self.b.node('Unsqueeze', [x, self.b.const(axes)]),
                 eqn.outvars[0].aval.shape)

  def _transpose(self, eqn, ins):
    x = self.full(ins[0], eqn.invars[0])
    perm = [int(p) for p in eqn.params['permutation']]
    return _Lazy(self.b.node('Transpose', [x], perm=perm),
                 eqn.outvars[0].aval.shape)

  def _concatenate(self, eqn, ins):
    names = [self.full(x, v) for x, v in zip(ins, eqn.invars)]
    return _Lazy(self.b.node('Concat', names,
                             axis=int(eqn.params['dimension'])),
                 eqn.outvars[0].aval.shape)

  def _pad(self, eqn, ins):
    config = eqn.params['padding_config']
    if any(int(interior) for _, _, interior in config):
      raise NotImplementedError('ONNX export: interior padding')
    x = self.full(ins[0], eqn.invars[0])
    pads = [int(lo) for lo, _, _ in config] + [int(hi) for _, hi, _ in config]
    value = self.full(ins[1], eqn.invars[1])
    return _Lazy(self.b.node('Pad', [x, self.b.const(np.array(pads, np.int64)),
                                     value], mode='constant'),
                 eqn.outvars[0].aval.shape)

  def _slice(self, eqn, ins):
    x = self.full(ins[0], eqn.invars[0])
    shape = eqn.invars[0].aval.shape
    starts, ends, axes = [], [], []
    strides = eqn.params['strides'] or (1,) * len(shape)
    for axis, (lo, hi, dim) in enumerate(zip(eqn.params['start_indices'],
                                             eqn.params['limit_indices'],
                                             shape)):
      if _is_int(lo) and int(lo) == 0 and _same_dim(hi, dim) and (
          int(strides[axis]) == 1):
        continue
      if not (_is_int(lo) and _is_int(hi)):
        raise NotImplementedError('ONNX export: a slice of a symbolic dim')
      starts.append(int(lo))
      ends.append(int(hi))
      axes.append(axis)
    if not axes:
      return _Lazy(x, eqn.outvars[0].aval.shape)
    steps = [int(strides[a]) for a in axes]
    i64 = lambda v: self.b.const(np.array(v, np.int64))
    return _Lazy(self.b.node('Slice', [x, i64(starts), i64(ends), i64(axes),
                                       i64(steps)]),
                 eqn.outvars[0].aval.shape)

  def _rev(self, eqn, ins):
    # ONNX has no reverse op; a Slice with step -1 over the whole axis is one.
    x = self.full(ins[0], eqn.invars[0])
    axes = [int(d) for d in eqn.params['dimensions']]
    if not axes:
      return _Lazy(x, eqn.outvars[0].aval.shape)
    i64 = lambda v: self.b.const(np.array(v, np.int64))
    lowest = np.iinfo(np.int64).min
    return _Lazy(self.b.node('Slice', [x, i64([-1] * len(axes)),
                                       i64([lowest] * len(axes)), i64(axes),
                                       i64([-1] * len(axes))]),
                 eqn.outvars[0].aval.shape)

  # ---- reductions ---------------------------------------------------------------

  def _reduce(self, eqn, ins, op):
    x = self.full(ins[0], eqn.invars[0])
    axes = np.array(eqn.params['axes'], np.int64)
    if op == 'ReduceSum' or self.b.opset >= 18:
      out = self.b.node(op, [x, self.b.const(axes)], keepdims=0)
    else:
      out = self.b.node(op, [x], axes=[int(a) for a in axes], keepdims=0)
    return _Lazy(out, eqn.outvars[0].aval.shape)

  def _reduce_max(self, eqn, ins):
    return self._reduce(eqn, ins, 'ReduceMax')

  def _reduce_min(self, eqn, ins):
    return self._reduce(eqn, ins, 'ReduceMin')

  def _reduce_sum(self, eqn, ins):
    return self._reduce(eqn, ins, 'ReduceSum')

  def _argmax(self, eqn, ins):
    (axis,) = eqn.params['axes']
    x = self.full(ins[0], eqn.invars[0])
    out = self.b.node('ArgMax', [x], axis=int(axis), keepdims=0)
    if np.dtype(eqn.params['index_dtype']) != np.int64:
      out = self.b.node('Cast', [out],
                        to=onnx_dtype(eqn.params['index_dtype']))
    return _Lazy(out, eqn.outvars[0].aval.shape)

  # ---- linear algebra, convolutions, pooling, gathers --------------------------

  def _dot_general(self, eqn, ins):
    (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
    lhs_aval, rhs_aval = eqn.invars[0].aval, eqn.invars[1].aval
    out_dtype = eqn.outvars[0].aval.dtype
    lhs = self.full(ins[0], eqn.invars[0])
    rank_l, rank_r = len(lhs_aval.shape), len(rhs_aval.shape)
    if (not lb and not rb and tuple(lc) == (rank_l - 1,) and rank_r == 2 and
        len(rc) == 1):
      # x @ W, the common case: a plain MatMul (W transposed if needed).
      rhs = ins[1]
      if int(rc[0]) == 1:
        if isinstance(rhs, _Lazy):
          rhs_name = self.b.node('Transpose', [self.full(rhs, eqn.invars[1])],
                                 perm=[1, 0])
        else:
          rhs_name = self.b.const(np.ascontiguousarray(
              self.cval(rhs, eqn.invars[1]).T))
      else:
        rhs_name = self.full(rhs, eqn.invars[1])
      out = self.b.node('MatMul', [lhs, rhs_name])
    else:
      rhs_name = self.full(ins[1], eqn.invars[1])
      letters = iter('abcdefghijklmnopqrstuvwxyz')
      l_sub = [next(letters) for _ in range(rank_l)]
      r_sub = [None] * rank_r
      for a, b in zip(lb, rb):
        r_sub[b] = l_sub[a]
      for a, b in zip(lc, rc):
        r_sub[b] = l_sub[a]
      r_sub = [s or next(letters) for s in r_sub]
      out_sub = ([l_sub[a] for a in lb] +
                 [l_sub[i] for i in range(rank_l) if i not in lb and
                  i not in lc] +
                 [r_sub[i] for i in range(rank_r) if i not in rb and
                  i not in rc])
      equation = f"{''.join(l_sub)},{''.join(r_sub)}->{''.join(out_sub)}"
      out = self.b.node('Einsum', [lhs, rhs_name], equation=equation)
    if np.dtype(out_dtype) != np.dtype(lhs_aval.dtype):
      out = self.b.node('Cast', [out], to=onnx_dtype(out_dtype))
    return _Lazy(out, eqn.outvars[0].aval.shape)

  def _conv_general_dilated(self, eqn, ins):
    p = eqn.params
    if any(int(d) != 1 for d in p['lhs_dilation']) or int(
        p['batch_group_count']) != 1:
      raise NotImplementedError('ONNX export: transposed or batch-grouped '
                                'convolution')
    lhs_spec, rhs_spec, out_spec = p['dimension_numbers']
    x = self.b.node('Transpose', [self.full(ins[0], eqn.invars[0])],
                    perm=[int(i) for i in lhs_spec])
    pads = [int(lo) for lo, _ in p['padding']] + [
        int(hi) for _, hi in p['padding']]
    attrs = dict(strides=[int(s) for s in p['window_strides']], pads=pads,
                 dilations=[int(d) for d in p['rhs_dilation']],
                 group=int(p['feature_group_count']))
    back = [list(out_spec).index(i) for i in range(len(out_spec))]
    shape = eqn.outvars[0].aval.shape
    w = ins[1]
    if isinstance(w, _Lazy):
      w = self.b.node('Transpose', [self.full(w, eqn.invars[1])],
                      perm=[int(i) for i in rhs_spec])
      y = self.b.node('Conv', [x, w], **attrs)
      return _Lazy(self.b.node('Transpose', [y], perm=back), shape)
    w = np.ascontiguousarray(np.transpose(self.cval(w, eqn.invars[1]),
                                          rhs_spec))
    return _PendingConv(x, w, None, attrs, back, shape, int(out_spec[1]))

  def _reduce_window_max(self, eqn, ins):
    p = eqn.params
    dims = [int(d) for d in p['window_dimensions']]
    if any(int(d) != 1 for d in p['base_dilation']):
      raise NotImplementedError('ONNX export: dilated max-pooling input')
    # The pooled axes are the spatial ones; NHWC pooling (window 1 on N, C)
    # becomes NCHW MaxPool.
    if len(dims) != 4 or dims[0] != 1 or dims[3] != 1:
      raise NotImplementedError('ONNX export: max-pooling other than NHWC')
    x = self.b.node('Transpose', [self.full(ins[0], eqn.invars[0])],
                    perm=[0, 3, 1, 2])
    pad = p['padding']
    y = self.b.node('MaxPool', [x], kernel_shape=dims[1:3],
                    strides=[int(s) for s in p['window_strides'][1:3]],
                    pads=[int(pad[1][0]), int(pad[2][0]), int(pad[1][1]),
                          int(pad[2][1])],
                    dilations=[int(d) for d in p['window_dilation'][1:3]])
    return _Lazy(self.b.node('Transpose', [y], perm=[0, 2, 3, 1]),
                 eqn.outvars[0].aval.shape)

  def _gather(self, eqn, ins):
    """Point gathers: every operand axis is either indexed (slice size 1,
    collapsed) or taken whole; lowered to GatherND on a transposed operand."""
    p = eqn.params
    dn = p['dimension_numbers']
    operand_aval, idx_aval = eqn.invars[0].aval, eqn.invars[1].aval
    rank = len(operand_aval.shape)
    indexed = [int(d) for d in dn.start_index_map]
    if (not isinstance(ins[1], _Lazy) and len(idx_aval.shape) == 1 and
        not dn.collapsed_slice_dims and not dn.operand_batching_dims and
        tuple(dn.offset_dims) == tuple(range(rank))):
      # A static slice (what x[:, a:b] becomes when the batch is symbolic).
      x = self.full(ins[0], eqn.invars[0])
      starts = [int(i) for i in self.cval(ins[1], eqn.invars[1])]
      ends = [s + int(p['slice_sizes'][d]) for s, d in zip(starts, indexed)]
      i64 = lambda v: self.b.const(np.array(v, np.int64))
      return _Lazy(self.b.node('Slice', [x, i64(starts), i64(ends),
                                         i64(indexed)]),
                   eqn.outvars[0].aval.shape)
    if (dn.operand_batching_dims or tuple(sorted(dn.collapsed_slice_dims)) !=
        tuple(sorted(indexed))):
      raise NotImplementedError('ONNX export: this form of gather')
    rest = [d for d in range(rank) if d not in indexed]
    for d, size in enumerate(p['slice_sizes']):
      want = 1 if d in indexed else operand_aval.shape[d]
      if not _same_dim(size, want):
        raise NotImplementedError('ONNX export: gather of partial slices')
    data = self.full(ins[0], eqn.invars[0])
    if indexed + rest != list(range(rank)):
      data = self.b.node('Transpose', [data], perm=indexed + rest)
    idx = ins[1]
    if isinstance(idx, _Lazy):
      idx = self.b.node('Cast', [self.full(idx, eqn.invars[1])],
                        to=TensorProto.INT64)
    else:
      idx = self.b.const(self.cval(idx, eqn.invars[1]).astype(np.int64))
    g = self.b.node('GatherND', [data, idx])
    # GatherND gives (index batch dims..., rest...); jax puts the rest at
    # offset_dims and the index batch dims elsewhere, in order.
    n_batch = len(idx_aval.shape) - 1
    offset = [int(d) for d in dn.offset_dims]
    out_rank = n_batch + len(rest)
    order, bi, ri = [], 0, 0
    for i in range(out_rank):
      if i in offset:
        order.append(n_batch + ri)
        ri += 1
      else:
        order.append(bi)
        bi += 1
    if order != list(range(out_rank)):
      g = self.b.node('Transpose', [g], perm=order)
    return _Lazy(g, eqn.outvars[0].aval.shape)


def to_onnx(fn: Callable, args: Sequence[jax.ShapeDtypeStruct],
            input_names: Sequence[str], output_names: Sequence[str],
            opset: int = OPSET, producer: str = 'simplenet_jax',
            doc: str = '') -> onnx.ModelProto:
  """Traces `fn` on `args` (shapes may hold `jax.export.symbolic_shape`
  dims, which become named dynamic ONNX dims) and returns the ONNX model.

  Raises:
    NotImplementedError: `fn` uses a primitive this module does not lower.
  """
  closed = jax.make_jaxpr(fn)(*args)
  b = _Builder(opset)
  inputs, graph_args = [], []
  for name, spec in zip(input_names, args):
    dims = []
    for axis, d in enumerate(spec.shape):
      if _is_int(d):
        dims.append(int(d))
      else:
        dims.append(str(d))
        b.bind_dim_var(str(d), name, axis)
    inputs.append(helper.make_tensor_value_info(name, onnx_dtype(spec.dtype),
                                                dims))
    graph_args.append(_Lazy(name, spec.shape))
  results = _Lowering(b).run(closed.jaxpr, closed.consts, graph_args)
  outputs = []
  for name, value, var in zip(output_names, results, closed.jaxpr.outvars):
    src = b.full(value, var.aval)
    b.nodes.append(helper.make_node('Identity', [src], [name],
                                    name=b.fresh('n_output')))
    dims = [int(d) if _is_int(d) else str(d) for d in var.aval.shape]
    outputs.append(helper.make_tensor_value_info(
        name, onnx_dtype(var.aval.dtype), dims))
  # Constants that folding left unused (a conv's weights before BatchNorm
  # was folded into them, ...).
  used = {i for n in b.nodes for i in n.input}
  graph = helper.make_graph(b.nodes, 'main', inputs, outputs,
                            initializer=[t for t in b.inits if t.name in used])
  model = helper.make_model(graph, producer_name=producer,
                            opset_imports=[helper.make_opsetid('', opset)],
                            doc_string=doc)
  # IR version 8 (the one of opset 17): readable by older runtimes too.
  model.ir_version = 8
  return model

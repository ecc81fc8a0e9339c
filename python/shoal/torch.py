"""shoal.torch: shoal's collectives for PyTorch scripts, in Horovod's shape.

    import shoal.torch as sh
    sh.init()                                  # the job `shoal run -n N -- ...` started
    model = ...; opt = torch.optim.Adam(model.parameters())
    sh.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = sh.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    for batch in my_shard_of_the_data:         # sh.rank() of sh.size()
        opt.zero_grad(); loss(model, batch).backward(); opt.step()

The data plane is shoal's: shared-memory rings between the processes of one host (a
single copy per hop), TCP between hosts. Collectives work in place on contiguous float32
CPU tensors without copying them (CUDA tensors are staged through host memory);
broadcasts take any dtype. Every rank must call the same collectives in the same order:
a mismatch raises `ShoalError` on every rank, naming both calls.
"""

import atexit
import contextlib

import torch

from . import _native
from ._native import ShoalError

__all__ = [
    "Average",
    "Sum",
    "ShoalError",
    "Handle",
    "init",
    "shutdown",
    "is_initialized",
    "rank",
    "size",
    "local_rank",
    "local_size",
    "allreduce",
    "allreduce_",
    "allreduce_async_",
    "broadcast_",
    "broadcast_async_",
    "allgather",
    "barrier",
    "poll",
    "synchronize",
    "broadcast_parameters",
    "broadcast_optimizer_state",
    "DistributedOptimizer",
    "SparseEmbedding",
]

#: Reduction operations.
Sum = "sum"
Average = "average"

_registered_exit = False


def init():
    """Joins the job: started by `shoal run -n N -- python script.py`, or described by
    torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); without either, a
    job of one process. Returns once every process has joined. Calling it again does
    nothing."""
    global _registered_exit
    _native.init()
    if not _registered_exit:
        atexit.register(shutdown)
        _registered_exit = True


# The sparse tables this process made, closed (in order) before it leaves the job.
_tables = []


def shutdown():
    """Waits for every operation in flight, leaves the sparse tables (every process must)
    and the job (also done at exit)."""
    while _tables:
        _tables.pop(0).close()
    _native.shutdown()


is_initialized = _native.is_initialized
rank = _native.rank
size = _native.size
local_rank = _native.local_rank
local_size = _native.local_size


class Handle:
    """An operation in flight (from an `*_async_` call): `poll()` is True once it has
    finished, `wait()` blocks until then (the GIL released), raises `ShoalError` if it
    failed, and returns its result."""

    def __init__(self, native, result, after=None):
        self._native = native
        self._result = result
        self._after = after
        self._waited = False

    def poll(self):
        return self._native.poll()

    def wait(self):
        if not self._waited:
            self._native.wait()
            self._waited = True
            if self._after is not None:
                self._after()
        return self._result


def poll(handle):
    """True once `handle`'s operation has finished."""
    return handle.poll()


def synchronize(handle):
    """Waits for `handle`'s operation and returns its result."""
    return handle.wait()


def _name(name, what, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"shoal: {what}: expected a torch.Tensor, got {type(t).__name__}")
    return name if name is not None else f"{what} of {tuple(t.shape)}"


def _check_contiguous(t, what):
    if not t.is_contiguous():
        raise ValueError(
            f"shoal: {what}: the tensor is not contiguous (strides {t.stride()} for shape "
            f"{tuple(t.shape)}); pass t.contiguous() and use the result"
        )


def _float_buffer(t, what):
    """The contiguous float32 CPU tensor an in-place collective on `t` works on, and
    what to do once it is done (copy back, for a CUDA tensor)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"shoal: {what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"shoal: {what}: float32 tensors only, this one is {t.dtype}")
    if t.layout != torch.strided:
        raise TypeError(f"shoal: {what}: dense tensors only, this one is {t.layout}")
    _check_contiguous(t, what)
    if t.device.type == "cpu":
        return t.detach(), None
    host = t.detach().to("cpu")
    return host, (lambda: t.detach().copy_(host))


def _check_op(op):
    if op not in (Sum, Average):
        raise ValueError(f"shoal: op must be shoal.torch.Sum or shoal.torch.Average, not {op!r}")


def allreduce_async_(tensor, op=Average, name=None):
    """Starts reducing `tensor` in place across the processes (the mean, or the sum with
    `op=Sum`); returns a `Handle`. Do not touch the tensor until the handle is waited."""
    _check_op(op)
    name = _name(name, "allreduce", tensor)
    buf, after = _float_buffer(tensor, name)
    h = _native.submit(op, buf.data_ptr(), buf.numel(), [buf, tensor], name)
    return Handle(h, tensor, after)


def allreduce_(tensor, op=Average, name=None):
    """Reduces `tensor` in place across the processes; returns it."""
    return allreduce_async_(tensor, op, name).wait()


def allreduce(tensor, op=Average, name=None):
    """The reduction of `tensor` across the processes, as a new tensor."""
    return allreduce_(tensor.detach().clone(memory_format=torch.contiguous_format), op, name)


def _byte_words(t, what):
    """A float32 view (or a padded copy) of any contiguous tensor's bytes, and what to do
    once a broadcast into it is done."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"shoal: {what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.float32:
        return _float_buffer(t, what)
    _check_contiguous(t, what)
    src = t.detach()
    host = src if src.device.type == "cpu" else src.to("cpu")
    raw = host.reshape(-1).view(torch.uint8)
    n = raw.numel()
    if n % 4 == 0 and raw.data_ptr() % 4 == 0:
        words = raw.view(torch.float32)
        after = None if host is src else (lambda: src.copy_(host))
        return words, after
    padded = torch.zeros((n + 3) // 4 * 4, dtype=torch.uint8)
    padded[:n].copy_(raw)

    def after():
        raw.copy_(padded[:n])
        if host is not src:
            src.copy_(host)

    return padded.view(torch.float32), after


def broadcast_async_(tensor, root_rank=0, name=None):
    """Starts copying `tensor` from process `root_rank` to the others, in place (any
    dtype); returns a `Handle`."""
    name = _name(name, "broadcast", tensor)
    words, after = _byte_words(tensor, name)
    h = _native.submit("broadcast", words.data_ptr(), words.numel(), [words, tensor], name, root=root_rank)
    return Handle(h, tensor, after)


def broadcast_(tensor, root_rank=0, name=None):
    """Copies `tensor` from process `root_rank` to the others, in place; returns it."""
    return broadcast_async_(tensor, root_rank, name).wait()


def allgather(tensor, name=None):
    """Every process's `tensor` concatenated along the first dimension, in rank order (as
    Horovod's: the first dimension may differ between processes, the others must not; a
    scalar gives one value per process)."""
    name = _name(name, "allgather", tensor)
    buf, _ = _float_buffer(tensor, name)
    n = size()
    if buf.dim() > 8:
        raise ValueError(f"shoal: {name}: at most 8 dimensions")
    # The shapes first: the rows each process has, and that the rest agrees.
    dims = list(buf.shape)
    mine = torch.tensor([buf.dim()] + dims + [0] * (8 - len(dims)), dtype=torch.int32).view(torch.float32)
    shapes = torch.empty(n * 9, dtype=torch.float32)
    _native.submit("allgather", mine.data_ptr(), 9, [mine, shapes], f"{name} (shapes)", out=shapes.data_ptr()).wait()
    rows = shapes.view(torch.int32).view(n, 9).tolist()
    shape_of = [tuple(row[1:1 + row[0]]) for row in rows]
    for r, sh in enumerate(shape_of):
        if len(sh) != len(shape_of[0]) or sh[1:] != shape_of[0][1:]:
            raise ShoalError(
                f"shoal: {name}: every process must gather the same shape but for the first "
                f"dimension; rank 0 has {shape_of[0]}, rank {r} {sh}"
            )
    if buf.dim() == 0:
        counts = [1] * n
    else:
        counts = [sh[0] for sh in shape_of]
    row = 1  # values per row
    for d in buf.shape[1:]:
        row *= d
    most = max(counts)
    # Every process sends `most` rows (its own, then padding): one allgather.
    padded = buf.reshape(-1) if counts[rank()] == most else torch.cat(
        [buf.reshape(-1), torch.zeros((most - counts[rank()]) * row)])
    out = torch.empty((n * most * row,), dtype=torch.float32)
    _native.submit("allgather", padded.data_ptr(), padded.numel(), [padded, out], name, out=out.data_ptr()).wait()
    if buf.dim() == 0:
        result = out
    else:
        parts = [out[r * most * row:(r * most + counts[r]) * row] for r in range(n)]
        result = (parts[0] if n == 1 else torch.cat(parts)).view((sum(counts),) + tuple(buf.shape[1:]))
    return result if tensor.device.type == "cpu" else result.to(tensor.device)


def barrier():
    """Returns once every process has called it."""
    _native.submit("barrier", 0, 0, [], "barrier").wait()


def _tensors_of(params):
    if isinstance(params, dict):
        return sorted(params.items())
    items = list(params)
    if items and isinstance(items[0], tuple):
        return items
    return [(str(i), t) for i, t in enumerate(items)]


def broadcast_parameters(params, root_rank=0):
    """Copies parameters and buffers from process `root_rank` to the others: a
    `state_dict()`, `named_parameters()` or a list of tensors."""
    handles = [
        broadcast_async_(t.data if isinstance(t, torch.nn.Parameter) else t, root_rank, name=f"broadcast of {k}")
        for k, t in _tensors_of(params)
        if isinstance(t, torch.Tensor)
    ]
    for h in handles:
        h.wait()


def broadcast_optimizer_state(optimizer, root_rank=0):
    """Copies the optimizer's state (its moments, step counts) and its hyper-parameters
    from process `root_rank` to the others. A process whose optimizer has no state yet
    (no step taken) builds it first by a step of zero gradients, its parameters kept."""
    if isinstance(optimizer, DistributedOptimizer):
        optimizer = optimizer._opt
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # Whether the root has state: then every process needs the same structure.
    flag = torch.tensor([float(len(optimizer.state) > 0)])
    broadcast_(flag, root_rank, name="broadcast of whether the optimizer has state")
    if flag.item() == 0.0:
        optimizer.state.clear()
        return
    if len(optimizer.state) == 0:
        kept = [p.detach().clone() for p in params]
        grads = [p.grad for p in params]
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        with torch.no_grad():
            for p, k, g in zip(params, kept, grads):
                p.copy_(k)
                p.grad = g
    handles = []
    scalars = []
    for i, p in enumerate(params):
        for key, v in sorted(optimizer.state.get(p, {}).items()):
            if isinstance(v, torch.Tensor):
                handles.append(broadcast_async_(v, root_rank, name=f"broadcast of optimizer state {i}.{key}"))
            elif isinstance(v, (int, float)):
                scalars.append((optimizer.state[p], key, type(v), torch.tensor([float(v)], dtype=torch.float64)))
    for g_i, group in enumerate(optimizer.param_groups):
        for key in sorted(group):
            if key != "params" and isinstance(group[key], (int, float)) and not isinstance(group[key], bool):
                scalars.append((group, key, type(group[key]), torch.tensor([float(group[key])], dtype=torch.float64)))
    for _, key, _, t in scalars:
        handles.append(broadcast_async_(t, root_rank, name=f"broadcast of optimizer option {key}"))
    for h in handles:
        h.wait()
    for holder, key, kind, t in scalars:
        holder[key] = kind(t.item())


class _Bucket:
    """Gradients reduced together: their values side by side in one flat buffer."""

    def __init__(self, params):
        self.params = params
        self.offsets = []
        n = 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.flat = torch.zeros(n, dtype=torch.float32)
        self.pending = len(params)
        self.handle = None


class DistributedOptimizer:
    """Wraps a torch optimizer: during `backward()`, gradients are averaged across the
    processes in buckets of about `bucket_cap_mb` as soon as each bucket's gradients are
    ready (last layers first, as DDP's buckets), overlapping the rest of the backward
    pass; `step()` waits for them and runs the wrapped optimizer. `synchronize()` waits
    early (to clip the averaged gradients); `step()` after it does not reduce again.
    Everything else (`zero_grad`, `param_groups`, `state_dict`, ...) is the wrapped
    optimizer's."""

    def __init__(self, optimizer, named_parameters=None, op=Average, bucket_cap_mb=25.0):
        _check_op(op)
        if not is_initialized():
            raise RuntimeError("shoal: init() has not been called (call shoal.torch.init() first)")
        if not (bucket_cap_mb > 0):
            raise ValueError(f"shoal: bucket_cap_mb must be positive, not {bucket_cap_mb}")
        self._opt = optimizer
        self._op = op
        names = {}
        if named_parameters is not None:
            for k, p in named_parameters:
                if id(p) in names:
                    raise ValueError(f"shoal: parameter {k} is named twice in named_parameters")
                names[id(p)] = k
        params = []
        seen = set()
        for g in optimizer.param_groups:
            for p in g["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        for i, p in enumerate(params):
            name = names.get(id(p), f"parameter {i}")
            if p.dtype != torch.float32:
                raise TypeError(f"shoal: {name}: float32 parameters only, this one is {p.dtype}")
        self._names = {id(p): names.get(id(p), f"parameter {i}") for i, p in enumerate(params)}
        cap = int(bucket_cap_mb * (1 << 20) / 4)
        self._buckets = []
        cur, cur_n = [], 0
        for p in reversed(params):
            cur.append(p)
            cur_n += p.numel()
            if cur_n >= cap:
                self._buckets.append(_Bucket(cur))
                cur, cur_n = [], 0
        if cur:
            self._buckets.append(_Bucket(cur))
        self._bucket_of = {}
        for b_i, b in enumerate(self._buckets):
            for j, p in enumerate(b.params):
                self._bucket_of[id(p)] = (b_i, j)
        self._next = 0
        self._synced = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in params]

    def _ready(self, p):
        b_i, _ = self._bucket_of[id(p)]
        b = self._buckets[b_i]
        if b.pending == 0:
            raise RuntimeError(
                f"shoal: the gradient of {self._names[id(p)]} was computed twice before step(); "
                "call step() (or synchronize()) after each backward()"
            )
        b.pending -= 1
        self._synced = False
        # In bucket order on every process, whatever order the gradients come in.
        while self._next < len(self._buckets) and self._buckets[self._next].pending == 0:
            self._launch(self._next)
            self._next += 1

    def _launch(self, b_i):
        b = self._buckets[b_i]
        with torch.no_grad():
            for p, off in zip(b.params, b.offsets):
                dst = b.flat[off:off + p.numel()]
                if p.grad is None:
                    dst.zero_()
                else:
                    dst.copy_(p.grad.reshape(-1))
        b.handle = _native.submit(self._op, b.flat.data_ptr(), b.flat.numel(), [b.flat], f"gradient bucket {b_i}")

    def synchronize(self):
        """Waits until every gradient is averaged across the processes (a parameter
        without a gradient counts as zeros, on every process alike)."""
        if self._synced:
            return
        while self._next < len(self._buckets):
            self._launch(self._next)
            self._next += 1
        with torch.no_grad():
            for b in self._buckets:
                b.handle.wait()
                b.handle = None
                for p, off in zip(b.params, b.offsets):
                    src = b.flat[off:off + p.numel()].view_as(p)
                    if p.grad is None:
                        p.grad = src.to(p.device, copy=True)
                    else:
                        p.grad.copy_(src)
                b.pending = len(b.params)
        self._next = 0
        self._synced = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Horovod's spelling: `synchronize()` was called; `step()` here does not wait."""
        self._synced = True
        yield

    def step(self, closure=None):
        self.synchronize()
        r = self._opt.step(closure)
        # The next step's gradients are reduced afresh.
        self._synced = False
        return r

    def zero_grad(self, set_to_none=True):
        return self._opt.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name):
        return getattr(self._opt, name)

    def __repr__(self):
        return f"shoal.torch.DistributedOptimizer({self._opt!r}, {len(self._buckets)} buckets)"


class _SparseRows(torch.autograd.Function):
    """The rows of a batch's keys from the shards; backward pushes their gradient."""

    @staticmethod
    def forward(ctx, anchor, keys, table, batch):
        uniq, inv = torch.unique(keys.reshape(-1), return_inverse=True)
        uniq = uniq.contiguous()
        rows = torch.empty(uniq.numel(), table.dim)
        table.pull(uniq.data_ptr(), uniq.numel(), rows.data_ptr())
        ctx.save_for_backward(uniq, inv)
        ctx.table, ctx.batch = table, batch
        return rows.index_select(0, inv).view(*keys.shape, table.dim)

    @staticmethod
    def backward(ctx, grad):
        uniq, inv = ctx.saved_tensors
        dim = ctx.table.dim
        g = torch.zeros(uniq.numel(), dim).index_add_(0, inv, grad.reshape(-1, dim).to(torch.float32))
        ctx.table.push(uniq.data_ptr(), uniq.numel(), g.data_ptr(), float(ctx.batch))
        return torch.zeros(0), None, None, None


class SparseEmbedding(torch.nn.Module):
    """An embedding whose rows live on the job's parameter-server shards, not in this
    process: `forward(keys)` (int64, shape `(batch, num_fields)`, any 64-bit ids: no
    vocabulary to size) pulls the rows of the batch's keys, creating new ones (uniform in
    +-`init_scale`, from a hash of the seed and the key), and returns `(batch, num_fields,
    dim)`; `backward()` pushes their gradient, and the shards apply the mean over the
    processes' batches with `optimizer` (sgd, adagrad, row-adagrad, adam: lazy, on the
    touched rows; ftrl) at `lr`. Updates are synchronous: the next pull sees every
    process's last push. Not in `parameters()`: the shards are its optimizer. In
    `eval()` mode (or under `torch.no_grad()`) a pull creates nothing.

    Every process makes its SparseEmbeddings in the same order; the first
    `SHOAL_PS_SHARDS` processes (`shoal run --ps M`; default all) host the shards, the
    rows spread over them by a hash of the key; the shards meet the processes over
    shared memory on one host, over TCP across hosts."""

    def __init__(self, num_fields, dim, optimizer="adagrad", lr=0.01, init_scale=0.01, seed=0, eps=1e-10,
                 betas=(0.9, 0.999)):
        super().__init__()
        if not is_initialized():
            raise RuntimeError("shoal: init() has not been called (call shoal.torch.init() first)")
        if not (isinstance(num_fields, int) and num_fields > 0):
            raise ValueError(f"shoal: SparseEmbedding: num_fields must be a positive integer, not {num_fields!r}")
        self.num_fields = num_fields
        self.dim = dim
        self._table = _native.sparse_table(dim, optimizer, lr, init_scale, seed, eps, betas[0], betas[1])
        _tables.append(self._table)
        # A zero-size input that requires grad, so that autograd calls the backward.
        self.register_buffer("_anchor", torch.zeros(0, requires_grad=True), persistent=False)

    @property
    def shards(self):
        """How many shards hold the rows."""
        return self._table.shards

    def local_rows(self):
        """How many rows this process's shard holds (0 if it hosts none)."""
        return self._table.local_rows()

    def forward(self, keys):
        if not isinstance(keys, torch.Tensor) or keys.dtype != torch.int64:
            got = keys.dtype if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise TypeError(f"shoal: SparseEmbedding: keys must be an int64 tensor, got {got}")
        if keys.dim() != 2 or keys.shape[1] != self.num_fields:
            raise ValueError(
                f"shoal: SparseEmbedding: keys of shape {tuple(keys.shape)}, expected (batch, {self.num_fields})"
            )
        keys = keys.detach().to("cpu").contiguous()
        if self.training and torch.is_grad_enabled():
            anchor = self._anchor.detach().requires_grad_(True)
            return _SparseRows.apply(anchor, keys, self._table, keys.shape[0])
        uniq, inv = torch.unique(keys.reshape(-1), return_inverse=True)
        uniq = uniq.contiguous()
        rows = torch.empty(uniq.numel(), self.dim)
        self._table.peek(uniq.data_ptr(), uniq.numel(), rows.data_ptr())
        return rows.index_select(0, inv).view(*keys.shape, self.dim)

    def extra_repr(self):
        return f"num_fields={self.num_fields}, dim={self.dim}, shards={self.shards}"

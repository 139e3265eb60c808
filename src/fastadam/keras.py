"""Keras 3 adapter: ``fastadam.keras.Adam``.

A ``keras.optimizers.Adam`` with Keras's signature, defaults (``epsilon=1e-7``) and
numerics: epsilon is the paper's epsilon-hat, i.e. fastadam's ``eps_hat`` form
``p -= m * lr * sqrt(1 - beta_2^t) / (1 - beta_1^t) / (sqrt(v) + epsilon)``.

Where it runs fastadam's kernels: with ``KERAS_BACKEND=torch`` and float32/float64
variables on the CPU, every update of a step (all variables; weight decay folded in, in
Keras's decoupled form) is ONE call into fastadam's kernels, in place on the variables'
memory. With ``KERAS_BACKEND=jax`` on the CPU, it is ONE XLA custom call inside Keras's
jitted train step (fastadam.jax's call: Keras donates the state it jits, so the kernels
update the variables' buffers in place). With ``KERAS_BACKEND=tensorflow`` on the CPU,
in a ``tf.function`` without XLA (``model.compile()``'s ``"auto"`` on a CPU-only
machine, or ``jit_compile=False``) or eagerly, it is ONE host callback
(``tf.py_function``) in Keras's train step that runs the kernels in place on the
variables' memory. Everything Keras does around the update (gradient
clipping, loss scaling, gradient accumulation, EMA, the iteration counter,
learning-rate schedules) is Keras's own. On any other backend, under XLA on TensorFlow
(``jit_compile=True``, or ``"auto"`` where TensorFlow sees a GPU: XLA cannot compile
a Python callback), under a tf.distribute strategy, for ``IndexedSlices`` gradients on
TensorFlow, or for variables the kernels cannot update (GPU, other dtypes), it is
exactly ``keras.optimizers.Adam``: Keras's own update, documented and tested here.

Registered for serialization as ``"fastadam>Adam"``: ``model.save`` /
``keras.models.load_model`` need no ``custom_objects``.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from fastadam._hints import missing_framework

try:
    import keras
except ImportError as exc:  # say what to install (issue 23)
    raise missing_framework("keras", exc) from exc

from fastadam._engine import Engine
from fastadam._threads import NumThreadsAttribute
from fastadam._validation import (
    check_at_least,
    check_beta,
    check_hyperparameters,
    check_real,
)

__all__ = ["Adam"]


@keras.saving.register_keras_serializable(package="fastadam")
class Adam(keras.optimizers.Adam):
    """Keras's Adam, updated by fastadam's kernels on the torch, JAX and TensorFlow
    backends (see the module).

    Takes ``keras.optimizers.Adam``'s arguments, plus ``num_threads`` (OpenMP threads of
    each step; None follows :func:`fastadam.get_num_threads`).
    """

    num_threads = NumThreadsAttribute()

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        weight_decay: Optional[float] = None,
        clipnorm: Optional[float] = None,
        clipvalue: Optional[float] = None,
        global_clipnorm: Optional[float] = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: Optional[int] = None,
        loss_scale_factor: Optional[float] = None,
        gradient_accumulation_steps: Optional[int] = None,
        name: str = "adam",
        num_threads: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        check_beta(beta_1, "beta_1")
        check_beta(beta_2, "beta_2")
        check_at_least(epsilon, "epsilon", 0.0)
        if weight_decay is not None:
            check_at_least(weight_decay, "weight_decay", 0.0)
        if isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool):
            check_at_least(learning_rate, "learning_rate", 0.0)
        super().__init__(
            learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
            amsgrad=amsgrad, weight_decay=weight_decay, clipnorm=clipnorm, clipvalue=clipvalue,
            global_clipnorm=global_clipnorm, use_ema=use_ema, ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency, loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps, name=name, **kwargs,
        )
        self.num_threads = num_threads
        self._fastadam: Optional[tuple] = None  # (key, kernel table or None): _kernel_table
        self.kernel_steps = 0  # steps that ran through fastadam's kernels (for tests)
        self.kernel_traces = 0  # JAX, TensorFlow: train steps traced with fastadam's call (for tests)

    def get_config(self) -> Dict[str, Any]:
        return {**super().get_config(), "num_threads": self.num_threads}

    # --- the fast path --------------------------------------------------------------------

    def _uses_kernels(self, variables: List[Any]) -> bool:
        if keras.backend.backend() == "jax":
            return _jax_usable(variables)
        if keras.backend.backend() == "tensorflow":
            return _tf_usable(variables)
        if keras.backend.backend() != "torch":
            return False
        import torch

        # eager under jit_compile too: the table is Python bookkeeping, not graph work
        return torch.compiler.disable(self._kernel_table)(variables) is not None

    def _apply_weight_decay(self, variables: List[Any]) -> None:
        if self._uses_kernels(variables):
            return  # folded into the kernel call of _backend_update_step
        super()._apply_weight_decay(variables)

    def _backend_update_step(self, grads: List[Any], trainable_variables: List[Any],
                             learning_rate: Any) -> None:
        if not self._uses_kernels(trainable_variables):
            super()._backend_update_step(grads, trainable_variables, learning_rate)
            return
        if keras.backend.backend() == "jax":
            self._update_in_xla(grads, trainable_variables, learning_rate)
            return
        if keras.backend.backend() == "tensorflow":
            self._update_on_host(grads, trainable_variables, learning_rate)
            return
        import torch

        # Under jit_compile=True (torch.compile of Keras's train step) the update runs
        # as one eager call: traced, its Python numbers (the iteration count, the
        # learning rate) specialised the graph, which was compiled again every step.
        torch.compiler.disable(self._update_with_kernels)(grads, trainable_variables,
                                                          learning_rate)

    def _update_with_kernels(self, grads: List[Any], trainable_variables: List[Any],
                             learning_rate: Any) -> None:
        import torch

        with torch.no_grad():
            table = self._kernel_table(trainable_variables)
            assert table is not None  # (_backend_update_step asked _uses_kernels)
            engine, order, gather, addresses = table
            lr = check_at_least(float(learning_rate), "learning_rate", 0.0)
            wd = 0.0 if self.weight_decay is None else check_real(self.weight_decay, "weight_decay")
            hypers = [self._hyperparameters(lr, decay) for decay in (0.0, wd)]
            ordered = [grads[i] for i in order]
            first_irregular, active = gather.run(addresses, ordered)
            if first_irregular >= 0:  # a variable moved, or a gradient the loop does not take
                self._general_update(grads, trainable_variables, learning_rate, hypers)
                return
            engine.set_steps(int(self.iterations))  # Keras's t is iterations + 1, for every variable
            engine.step_pointers(addresses, active, hypers, grad_scale=1.0,
                                 num_threads=self.num_threads)
        self.kernel_steps += 1

    def _hyperparameters(self, lr: float, weight_decay: float) -> Any:
        return check_hyperparameters(
            lr=lr, beta1=float(self.beta_1), beta2=float(self.beta_2), eps=float(self.epsilon),
            weight_decay=weight_decay, decoupled_weight_decay=True, amsgrad=bool(self.amsgrad),
            maximize=False, eps_hat=True, eps_root=0.0)

    def _update_in_xla(self, grads: List[Any], variables: List[Any], learning_rate: Any) -> None:
        """The JAX backend's update, traced into Keras's train step: one custom call over
        every variable (fastadam.jax.call_kernels), decayed variables first, with the
        traced learning rate and iteration count; its results are assigned to the
        variables (in Keras's stateless scope: the new state Keras returns and donates)."""
        import jax.numpy as jnp

        from fastadam.jax import call_kernels

        decayed = [self.weight_decay is not None and self._use_weight_decay(v) for v in variables]
        order = sorted(range(len(variables)), key=lambda i: not decayed[i])  # stable
        slots = [self._get_variable_index(variables[i]) for i in order]
        wd = 0.0 if self.weight_decay is None else check_real(self.weight_decay, "weight_decay")
        params = [variables[i].value for i in order]
        grads = [jnp.asarray(grads[i], params[j].dtype) for j, i in enumerate(order)]
        lr = jnp.asarray(keras.ops.convert_to_tensor(learning_rate))
        _, params, mu, nu, nu_max = call_kernels(
            jnp.asarray(keras.ops.convert_to_tensor(self.iterations)), lr, params, grads,
            [self._momentums[k].value for k in slots], [self._velocities[k].value for k in slots],
            [self._velocity_hats[k].value for k in slots] if self.amsgrad else None,
            self._hyperparameters(0.0, wd), sum(decayed), self.num_threads)
        for j, i in enumerate(order):
            variables[i].assign(params[j])
            self._momentums[slots[j]].assign(mu[j])
            self._velocities[slots[j]].assign(nu[j])
            if self.amsgrad:
                self._velocity_hats[slots[j]].assign(nu_max[j])
        self.kernel_traces += 1

    def _update_on_host(self, grads: List[Any], variables: List[Any], learning_rate: Any) -> None:
        """The TensorFlow backend's update, traced into Keras's train step: one
        ``tf.py_function`` (a host callback: no custom op to build against the user's
        TensorFlow) runs the kernels over every variable in place. Its inputs are the
        iteration count, the learning rate, the dense gradients, the variables and their
        moments as read in the graph (on the CPU a read shares the variable's buffer, so
        its NumPy view is the variable's memory), and their resource handles, so that
        TensorFlow orders every later read or write of those variables after the call."""
        import tensorflow as tf

        sparse = [i for i, g in enumerate(grads) if isinstance(g, tf.IndexedSlices)]
        if sparse:
            # Keras's own update for these: its Adam squares each slice of an
            # IndexedSlices gradient before repeated rows are summed, a number the dense
            # kernels do not compute (they square the sum, as on every other backend).
            super()._apply_weight_decay([variables[i] for i in sparse])
            super()._backend_update_step([grads[i] for i in sparse],
                                         [variables[i] for i in sparse], learning_rate)
            grads = [g for i, g in enumerate(grads) if i not in sparse]
            variables = [v for i, v in enumerate(variables) if i not in sparse]
            if not variables:
                return
        decayed = [self.weight_decay is not None and self._use_weight_decay(v) for v in variables]
        order = sorted(range(len(variables)), key=lambda i: decayed[i])  # stable: groups contiguous
        slots = [self._get_variable_index(variables[i]) for i in order]
        holders = [variables[i].value for i in order]  # tf.Variables: params, then each state
        for moments in (self._momentums, self._velocities) + ((self._velocity_hats,) if self.amsgrad else ()):
            holders += [moments[k].value for k in slots]
        dense = [tf.cast(grads[i], holders[j].dtype) for j, i in enumerate(order)]
        paths = tuple(variables[i].path for i in order)
        layout = _HostLayout(paths, tuple(f"the gradient of {path}" for path in paths),
                             sum(not d for d in decayed), bool(self.amsgrad), tuple(holders))
        lr = tf.convert_to_tensor(keras.ops.convert_to_tensor(learning_rate))

        def host_step(*tensors: Any) -> None:
            self._host_step(layout, *tensors)

        iteration = keras.ops.convert_to_tensor(self.iterations)  # a tensor under accumulation
        tf.py_function(host_step, [iteration, lr, *dense,
                                   *[h.value() for h in holders], *[h.handle for h in holders]],
                       Tout=[], name="fastadam_step")
        self.kernel_traces += 1

    def _host_step(self, layout: "_HostLayout", iteration: Any, lr: Any, *tensors: Any) -> None:
        """The body of _update_on_host's callback (eager): fastadam's kernels over the
        variables' memory."""
        n, count = len(layout.names), len(layout.holders)
        grads = [t._numpy() for t in tensors[:n]]  # views, no copies
        wd = 0.0 if self.weight_decay is None else check_real(self.weight_decay, "weight_decay")
        hypers = [self._hyperparameters(check_at_least(float(lr), "learning_rate", 0.0), decay)
                  for decay in (0.0, wd)]
        engine, arrays, copied = self._host_engine(layout, tensors[n:n + count])
        for k in copied:  # the variable as it is now, into the kernels' copy
            np.copyto(arrays[k], tensors[n + k]._numpy())
        engine.set_steps(int(iteration))  # Keras's t is iterations + 1, for every variable
        engine.step(grads, hypers, grad_scale=1.0, num_threads=self.num_threads,
                    names=layout.grad_names)
        for k in copied:
            layout.holders[k].assign(arrays[k])
        self.kernel_steps += 1

    def _host_engine(self, layout: "_HostLayout", values: Sequence[Any]) -> tuple:
        """(engine, arrays, copied): an engine over the variables' memory (``arrays``:
        params of the undecayed group, then the decayed, then each state, Keras's moments
        adopted as the engine's), cached while the variables' reads stay where they
        were; ``copied``: the indices of variables TensorFlow only hands out copies of
        (copy-on-read mode, after sparse access), whose update the kernels compute on
        a copy of their own that is assigned back.

        TensorFlow shares buffers copy-on-write (two moment variables initialised from
        one zeros tensor share one), which in-place writes would bypass: a rebuild first
        gives every variable a buffer of its own (assigns it a deep copy of itself)."""
        import tensorflow as tf

        addresses = [_address(t) for t in values]
        if self._fastadam is not None and _same_layout(self._fastadam[0][0], layout):
            (_, known), table = self._fastadam  # (a retrace of the train step: same variables)
            if all(a == b for k, (a, b) in enumerate(zip(addresses, known)) if k not in table[2]):
                return table
        arrays, copied = [], []
        for k, (holder, value) in enumerate(zip(layout.holders, values)):
            holder.assign(tf.raw_ops.DeepCopy(x=value))  # a buffer of its own
            own = holder.value()
            if _address(own) != _address(holder.value()):  # every read is a copy
                own = tf.raw_ops.DeepCopy(x=value)
                copied.append(k)
            arrays.append(own._numpy())
        n = len(layout.names)
        engine = Engine()
        engine.add(arrays[:layout.undecayed], 0, list(layout.names[:layout.undecayed]))
        engine.add(arrays[layout.undecayed:n], 1, list(layout.names[layout.undecayed:]))
        for s, state in enumerate(("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[:2 + layout.amsgrad]):
            for i in range(n):
                engine.adopt(i, state, arrays[n * (s + 1) + i])
        table = (engine, arrays, copied)
        self._fastadam = ((layout, [_address(a) for a in arrays]), table)
        return table

    def _general_update(self, grads: List[Any], variables: List[Any], learning_rate: Any,
                        hypers: List[Any]) -> None:
        """The update with every check by name: the engine is rebuilt over the variables'
        memory as it is now, or, where the kernels cannot update them any more, Keras's
        own update (weight decay included: the kernel path had left it out)."""
        import torch

        self._fastadam = None
        table = self._kernel_table(variables)
        if table is None:
            super()._apply_weight_decay(variables)
            super()._backend_update_step(grads, variables, learning_rate)
            return
        engine, order, _, _ = table  # (the rebuilt table's order)
        engine.set_steps(int(self.iterations))
        engine.step([torch.as_tensor(grads[i]).detach().contiguous().numpy() for i in order],
                    hypers, grad_scale=1.0, num_threads=self.num_threads,
                    names=[f"the gradient of {variables[i].path}" for i in order])
        self.kernel_steps += 1


    def _kernel_table(self, variables: List[Any]) -> Optional[tuple]:
        """(engine, order, gather, addresses) over these variables, with Keras's moment
        variables as the engine's state; None when the kernels cannot update them (not
        CPU float32/float64 contiguous tensors). Cached while the same variables come:
        the compiled gather then checks their memory and gradients every step."""
        import torch

        key = (self.weight_decay is not None, bool(self.amsgrad), tuple(map(id, variables)))
        if self._fastadam is not None and self._fastadam[0] == key:
            return self._fastadam[1]
        values = [v.value for v in variables]
        usable = all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
                     and t.dtype in (torch.float32, torch.float64) and t.is_contiguous()
                     for t in values)
        table = self._build_table(variables, values) if usable else None
        self._fastadam = (key, table)
        return table

    def _build_table(self, variables: List[Any], values: List[Any]) -> tuple:
        import numpy as np
        import torch

        from fastadam._torch_gather import Gather, torch_layout_guards

        # Group 0: no weight decay; group 1: decayed (Keras's per-variable exclusions).
        decayed = [self.weight_decay is not None and self._use_weight_decay(v) for v in variables]
        order = sorted(range(len(variables)), key=lambda i: decayed[i])  # stable: groups contiguous

        def view(variable: Any) -> Any:
            return variable.value.detach().numpy()

        engine = Engine()
        for group in (0, 1):
            members = [i for i in order if int(decayed[i]) == group]
            engine.add([view(variables[i]) for i in members], group,
                       [variables[i].path for i in members])
        for i, k in enumerate(self._get_variable_index(variables[j]) for j in order):
            engine.adopt(i, "exp_avg", view(self._momentums[k]))
            engine.adopt(i, "exp_avg_sq", view(self._velocities[k]))
            if self.amsgrad:
                engine.adopt(i, "max_exp_avg_sq", view(self._velocity_hats[k]))
        tensors = [values[i] for i in order]
        gather = Gather(tensors, [t.dtype for t in tensors], [t.shape for t in tensors],
                        [t.stride() for t in tensors],
                        np.array([t.data_ptr() for t in tensors], np.int64),
                        np.array([t.numel() for t in tensors], np.int64), torch.Tensor,
                        torch_layout_guards())
        return engine, order, gather, np.zeros(len(tensors), np.int64)


class _HostLayout(NamedTuple):
    """What the TensorFlow callback needs to know about its inputs (fixed at trace)."""

    names: Tuple[str, ...]  # of the variables, in the callback's order
    grad_names: Tuple[str, ...]  # "the gradient of <name>": the step's error messages
    undecayed: int  # the first ones, without weight decay
    amsgrad: bool
    holders: Tuple[Any, ...]  # tf.Variables: the params, then exp_avg, exp_avg_sq(, max)


def _same_layout(a: _HostLayout, b: _HostLayout) -> bool:
    """The same variables (the very objects) in the same roles?"""
    return (a.undecayed, a.amsgrad, len(a.holders)) == (b.undecayed, b.amsgrad, len(b.holders)) \
        and all(x is y for x, y in zip(a.holders, b.holders))


def _address(tensor: Any) -> int:
    """Where a TensorFlow CPU tensor's (or a NumPy array's) data is."""
    array = tensor if isinstance(tensor, np.ndarray) else tensor._numpy()
    return int(array.__array_interface__["data"][0])


def _tf_usable(variables: List[Any]) -> bool:
    """Can fastadam's host callback update these variables (TensorFlow backend):
    float32/float64 on the CPU, outside XLA (``jit_compile=True`` cannot compile a
    Python callback) and outside a tf.distribute strategy (which reduces gradients
    across replicas and mirrors the variables)?"""
    import tensorflow as tf
    from tensorflow.python.framework import ops
    from tensorflow.python.ops import control_flow_util

    if tf.distribute.has_strategy() or control_flow_util.GraphOrParentsInXlaContext(
            ops.get_default_graph()):
        return False
    return all(str(v.dtype) in ("float32", "float64") and "GPU" not in v.value.device.upper()
               for v in variables)


def _jax_usable(variables: List[Any]) -> bool:
    """Can fastadam's XLA call update these variables (JAX backend): float32/float64 on
    XLA's CPU backend?"""
    import jax

    return jax.default_backend() == "cpu" and all(
        str(v.dtype) in ("float32", "float64") for v in variables)

"""fastadam.torch with sparse COO gradients (nn.Embedding(sparse=True)) against
torch.optim.SparseAdam, and dense params of the same model against torch's fused Adam."""

import copy

import pytest

from conftest import default_capability_mark

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastadam.torch")

needs_default_capability = default_capability_mark(torch)
TORCH_DTYPES = [torch.float32, torch.float64]
VOCAB, DIM, STEPS = 300, 16, 40


def token_batches(n=STEPS, batch=48, seed=1):
    """Token ids drawn from a skewed distribution (frequent tokens repeat in a batch, as
    in text) and a fixed random target per batch."""
    gen = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)
    return [(torch.multinomial(weights, batch, replacement=True, generator=gen),
             torch.randn(batch, DIM, generator=gen, dtype=torch.float64)) for _ in range(n)]


def embedding(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Embedding(VOCAB, DIM, sparse=True).to(dtype)


def train_embedding(opt_class, dtype, **kwargs):
    """Train an embedding; the loss is linear in the table, so both optimizers see the
    very same gradients however their parameters drift apart."""
    emb = embedding(dtype)
    opt = opt_class(emb.parameters(), **kwargs)
    for ids, target in token_batches():
        opt.zero_grad()
        (emb(ids) * target.to(dtype)).sum().backward()
        assert emb.weight.grad.is_sparse and not emb.weight.grad.is_coalesced()
        opt.step()
    return emb.weight.detach(), opt.state[emb.weight]


def sparse_adam(params, lr=1e-3, eps=1e-8):
    """torch.optim.SparseAdam; it refuses eps=0 at construction, but its math takes it."""
    opt = torch.optim.SparseAdam(params, lr=lr, eps=max(eps, 1e-8))
    opt.param_groups[0]["eps"] = eps
    return opt


def max_ulps(a, b):
    """The largest difference, in ulps of the larger magnitude of the two tensors."""
    ulp = torch.finfo(a.dtype).eps * torch.maximum(a.abs(), b.abs()).max()
    return ((a - b).abs().max() / ulp).item()


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_matches_sparse_adam_with_eps_zero(dtype):
    # With eps=0 SparseAdam's form (eps on the un-corrected sqrt(v)) and the paper's are
    # the same math; what remains is rounding: SparseAdam computes v as v + (g*g - v)*(1 -
    # beta2) and the step as (lr*sqrt(bc2)/bc1) * (m / sqrt(v)), fastadam as docs/design.md
    # states. A few ulps per step, over 40 steps.
    ours, our_state = train_embedding(ft.Adam, dtype, lr=1e-2, eps=0.0)
    theirs, their_state = train_embedding(sparse_adam, dtype, lr=1e-2, eps=0.0)
    assert max_ulps(ours, theirs) < 64
    assert max_ulps(our_state["exp_avg"], their_state["exp_avg"]) < 16
    assert max_ulps(our_state["exp_avg_sq"], their_state["exp_avg_sq"]) < 16
    assert int(our_state["step"]) == int(their_state["step"]) == STEPS
    untouched = (their_state["exp_avg_sq"] == 0).all(dim=1)
    assert untouched.any()  # rare tokens never drawn: their rows must not have moved at all
    assert torch.equal(ours[untouched], embedding(dtype).weight.detach()[untouched])


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_close_to_sparse_adam_with_default_eps(dtype):
    # eps=1e-8: fastadam adds eps to sqrt(v)/sqrt(bc2), SparseAdam to sqrt(v), which
    # changes an update by a relative O(eps * (1/sqrt(bc2) - 1) / sqrt(v)/sqrt(bc2)): tiny
    # where v is of order one, up to a few percent of a step for an element whose few
    # gradients were tiny. Measured: 5.7e-6 at most over 40 steps of lr=1e-2; allowed:
    # a thousandth of one step (1e-5).
    ours, our_state = train_embedding(ft.Adam, dtype, lr=1e-2)
    theirs, their_state = train_embedding(sparse_adam, dtype, lr=1e-2)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(our_state["exp_avg"], their_state["exp_avg"], rtol=1e-5, atol=0)


def test_uncoalesced_and_coalesced_gradients_give_the_same_step():
    # each row at most twice: a + b == b + a, so torch's coalesce and fastadam's own
    # summing of duplicates must agree exactly
    results = []
    for coalesce in (False, True):
        emb = embedding(torch.float32)
        opt = ft.Adam(emb.parameters(), lr=0.1)
        emb(torch.tensor([5, 1, 5, 7, 1, 9])).pow(2).sum().backward()
        if coalesce:
            emb.weight.grad = emb.weight.grad.coalesce()
        opt.step()
        results.append(emb.weight.detach().clone())
    assert torch.equal(*results)


class Mixed(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, DIM, sparse=True)
        self.head = torch.nn.Sequential(torch.nn.Linear(DIM, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
        self.to(dtype)

    def forward(self, ids):
        return self.head(self.emb(ids))


@needs_default_capability
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_mixed_model_dense_params_stay_bit_identical_to_fused_adam(dtype):
    # The embedding's group has eps=0, where SparseAdam's epsilon form and fastadam's
    # are the same math (cross-entropy gradients of an embedding are tiny, so with eps=1e-8
    # the two forms differ visibly); the dense group keeps the default eps.
    ours, ref = Mixed(dtype), Mixed(dtype)
    opt = ft.Adam([{"params": [ours.emb.weight], "eps": 0.0}, {"params": ours.head.parameters()}],
                  lr=1e-2)
    ref_dense = torch.optim.Adam(ref.head.parameters(), lr=1e-2, fused=True)
    ref_sparse = sparse_adam([ref.emb.weight], lr=1e-2, eps=0.0)
    gen = torch.Generator().manual_seed(3)
    for ids, _ in token_batches(n=12):
        labels = torch.randint(0, 3, ids.shape, generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ours(ids), labels).backward()
        # the reference optimizers step on exactly our gradients
        for p, q in zip(ours.parameters(), ref.parameters()):
            q.grad = p.grad.clone()
        opt.step()
        ref_dense.step()
        ref_sparse.step()
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            if name.startswith("emb."):
                assert max_ulps(p, q) < 64
            else:
                assert torch.equal(p, q), name
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        if not name.startswith("emb."):
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][key], ref_dense.state[q][key]), (name, key)


def test_state_dict_moves_between_fastadam_and_sparse_adam():
    data = token_batches(n=6)

    def run(opt, emb, batches):
        for ids, target in batches:
            opt.zero_grad()
            (emb(ids) * target.float()).sum().backward()
            opt.step()

    # fastadam -> SparseAdam: SparseAdam continues from our state (eps=0: same math)
    emb_a = embedding(torch.float32)
    ours = ft.Adam(emb_a.parameters(), lr=1e-2, eps=0.0)
    run(ours, emb_a, data[:3])
    emb_b = embedding(torch.float32)
    emb_b.weight.data.copy_(emb_a.weight.detach())
    theirs = sparse_adam(emb_b.parameters(), lr=1e-2, eps=0.0)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))  # as if saved: no shared tensors
    assert theirs.state[emb_b.weight]["step"] == 3
    run(ours, emb_a, data[3:])
    run(theirs, emb_b, data[3:])
    assert max_ulps(emb_a.weight.detach(), emb_b.weight.detach()) < 64

    # SparseAdam -> fastadam
    emb_c = embedding(torch.float32)
    emb_c.weight.data.copy_(emb_b.weight.detach())
    again = ft.Adam(emb_c.parameters(), lr=1e-2, eps=0.0)
    again.load_state_dict(copy.deepcopy(theirs.state_dict()))
    run(again, emb_c, data[:2])
    run(theirs, emb_b, data[:2])
    assert int(again.state[emb_c.weight]["step"]) == 8
    assert max_ulps(emb_c.weight.detach(), emb_b.weight.detach()) < 64


def test_unsupported_sparse_layouts_are_refused_and_change_nothing():
    emb = embedding(torch.float32)
    opt = ft.Adam(emb.parameters())
    before = emb.weight.detach().clone()
    # (torch itself refuses a CSR .grad for a strided param, so only COO layouts get here)
    emb.weight.grad = torch.zeros(VOCAB, DIM).to_sparse(2)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] has a sparse gradient "
                       r"with 2 sparse dimensions"):
        opt.step()
    sparse_param = torch.nn.Parameter(torch.zeros(4, 3).to_sparse())
    sparse_param.grad = torch.zeros(4, 3).to_sparse()
    with pytest.raises(TypeError, match=r"has layout torch.sparse_coo; fastadam.torch updates dense"):
        ft.Adam([sparse_param]).step()
    # torch does not check a COO tensor's indices unless asked: fastadam does
    emb.weight.grad = torch.sparse_coo_tensor(torch.tensor([[0, VOCAB]]), torch.ones(2, DIM), (VOCAB, DIM),
                                              check_invariants=False)
    with pytest.raises(ValueError, match=r"the gradient of param_groups\[0\]\['params'\]\[0\]\[0\] "
                       r"\(rows\) must be in \[0, 300\)"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before) and not opt.state

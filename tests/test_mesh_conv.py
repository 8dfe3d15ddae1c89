"""Mesh convolutions (net.step.block=mesh): stencils, equivariance, plumbing through the builder."""

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from deepunroll.nets.blocks import make_block
from deepunroll.nets.build import build_model
from deepunroll.nets.mesh_conv import MeshBlock, MeshLSTMAccelerator, element_stencils
from deepunroll.operators.eit import EIT
from deepunroll.operators.toy import NonlinearConv1d


@pytest.fixture(scope="module")
def mesh():
    nodes, elements = EIT(h0=0.2).element_mesh()
    return nodes.numpy(), elements.numpy()


def test_stencils_differentiate_linear_fields_exactly_and_average_neighbours(mesh):
    nodes, elements = mesh
    support, weights = element_stencils(nodes, elements)
    centroids = nodes[elements].mean(axis=1)
    field = torch.as_tensor(2.0 * centroids[:, 0] - 3.0 * centroids[:, 1] + 0.5, dtype=torch.float32)
    stencil = torch.einsum("esk,ek->es", weights, field[support])
    # slopes in units of the mean distance between neighbouring centroids
    pairs = [(i, j) for i in range(len(elements)) for j in support[i, weights[i, 0] > 0].tolist()]
    spacing = np.mean([np.linalg.norm(centroids[i] - centroids[j]) for i, j in pairs])
    assert torch.allclose(stencil[:, 1], torch.full_like(stencil[:, 1], 2.0 * spacing), rtol=1e-5)
    assert torch.allclose(stencil[:, 2], torch.full_like(stencil[:, 2], -3.0 * spacing), rtol=1e-5)
    # the mean stencil removes constants and averages the vertex-sharing neighbours
    ones = torch.ones(len(elements))
    assert float(torch.einsum("ek,ek->e", weights[:, 0], ones[support]).abs().max()) < 1e-6
    shared = [set(np.flatnonzero(np.isin(elements, elements[i]).any(axis=1))) - {i} for i in range(len(elements))]
    for i in (0, len(elements) // 2, len(elements) - 1):
        used = set(support[i, weights[i, 0] > 0].tolist())
        assert used == shared[i]


def test_mesh_block_is_equivariant_to_the_element_numbering(mesh):
    """Relabelling the elements relabels the output: the block depends on the mesh, not on the numbering (a 1D
    convolution over the element vector is not)."""
    nodes, elements = mesh
    torch.manual_seed(0)
    block = MeshBlock((nodes, elements), 2, 1, hidden=8, n_conv=3)
    perm = torch.randperm(len(elements))
    permuted = MeshBlock((nodes, elements[perm.numpy()]), 2, 1, hidden=8, n_conv=3)
    permuted.load_state_dict(block.state_dict())
    x = torch.randn(3, 2, len(elements))
    assert torch.allclose(permuted(x[..., perm]), block(x)[..., perm], atol=1e-5)
    cnn = make_block("cnn", 2, 1, 8, 3, 1)
    assert not torch.allclose(cnn(x[..., perm]), cnn(x)[..., perm], atol=1e-2)


def test_mesh_block_zero_init_and_gradients(mesh):
    block = MeshBlock(mesh, 3, 1, hidden=8, n_conv=4, zero_init=True)
    x = torch.randn(2, 3, len(mesh[1]), requires_grad=True)
    assert float(block(x).detach().abs().max()) == 0.0
    torch.nn.init.normal_(block.layers[-1].mix.weight)
    block(x).square().sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in block.parameters())
    assert not any(name.endswith(("support", "weights")) for name in block.state_dict())  # rebuilt, never saved


def _net_cfg(block: str):
    return OmegaConf.create({"n_iter": 2, "grad_through_operator": False, "direction": "raw", "step": {
        "_target_": "deepunroll.nets.lpgd.LPGDStep", "hidden": 8, "n_conv": 3, "zero_init": True, "block": block}})


def test_builder_hands_the_operators_mesh_to_the_step():
    operator = EIT(h0=0.3, n_electrodes=8)
    model = build_model(_net_cfg("mesh"), OmegaConf.create({"_target_": "deepunroll.nets.accel.NoAcceleration"}), operator)
    assert isinstance(model.step.blocks[0], MeshBlock)
    y = operator(torch.ones(2, operator.n_in, dtype=torch.float64)).float()
    x0 = torch.full((2, operator.n_in), 1.1)
    assert torch.equal(model(y, x0), x0)  # zero-initialised: returns x0


def test_mesh_block_on_an_operator_without_a_mesh_is_one_clear_error():
    with pytest.raises(InstantiationException, match="net.step.block=mesh needs an operator"):
        build_model(_net_cfg("mesh"), OmegaConf.create({"_target_": "deepunroll.nets.accel.NoAcceleration"}),
                    NonlinearConv1d())


def test_mesh_lstm_is_equivariant_reads_d_and_carries_its_state(mesh):
    nodes, elements = mesh
    torch.manual_seed(0)
    accel = MeshLSTMAccelerator(4, (nodes, elements))
    perm = torch.randperm(len(elements))
    permuted = MeshLSTMAccelerator(4, (nodes, elements[perm.numpy()]))
    permuted.load_state_dict(accel.state_dict())
    d = torch.randn(2, len(elements))
    v1, state = accel(d, accel.init_state(d))
    v2, _ = accel(d, state)
    w1, pstate = permuted(d[:, perm], permuted.init_state(d))
    w2, _ = permuted(d[:, perm], pstate)
    assert torch.allclose(w1, v1[:, perm], atol=1e-6) and torch.allclose(w2, v2[:, perm], atol=1e-6)
    assert float((v2 - v1).abs().max()) > 1e-3  # the carried state changes the second step
    v0, _ = accel(torch.zeros_like(d), accel.init_state(d))
    assert float((v1 - v0).abs().mean()) > 1e-2  # the velocity depends on d
    assert sum(p.numel() for p in accel.parameters()) == 4 * (4 * 5) * 4 + 4 * 4 + 4 + 1  # gates + readout


def test_mesh_lstm_on_an_operator_without_a_mesh_is_one_clear_error():
    with pytest.raises(InstantiationException, match="accel=mesh_lstm needs an operator"):
        build_model(_net_cfg("cnn"), OmegaConf.create({"_target_": "deepunroll.nets.mesh_conv.MeshLSTMAccelerator"}),
                    NonlinearConv1d())

"""GPU checks: skipped without CUDA; the rest of the suite never needs a GPU."""

import pytest
import torch

from conftest import compose_config
from deepunroll.operators.eit import EIT
from deepunroll.operators.toy import NonlinearConv1d
from deepunroll.pipeline import build_problem

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("make", [lambda: NonlinearConv1d(a=1.5), lambda: EIT(n_electrodes=16, h0=0.2)],
                         ids=["toy", "eit"])
def test_operator_on_cuda_matches_cpu(make):
    op = make()
    x = 1 + 0.1 * torch.rand(4, *op.in_shape, dtype=torch.float64)
    v = torch.randn(4, *op.out_shape, dtype=torch.float64)
    op_gpu = make().to("cuda")
    y_gpu = op_gpu(x.cuda())
    assert y_gpu.device.type == "cuda"
    torch.testing.assert_close(y_gpu.cpu(), op(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op_gpu.vjp(x.cuda(), v.cuda()).cpu(), op.vjp(x, v), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver", ["dense", "sparse"])
def test_both_solve_paths_on_cuda_match_cpu(solver):
    cpu, gpu = EIT(h0=0.1, solver=solver), EIT(h0=0.1, solver=solver).to("cuda")
    x = 1 + 0.5 * torch.rand(6, cpu.n_elems, dtype=torch.float64)
    y = cpu(1.1 * x)
    assert gpu.fem_solver().name == solver
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gpu.misfit_grad(x.cuda(), y.cuda()).cpu(), cpu.misfit_grad(x, y), rtol=1e-9, atol=1e-14)
    xg = x.cuda().requires_grad_()
    (grad,) = torch.autograd.grad(gpu(xg).square().sum(), xg)
    torch.testing.assert_close(grad.cpu(), cpu.vjp(x, 2 * cpu(x)), rtol=1e-9, atol=1e-14)


def test_training_step_stays_on_the_gpu():
    cfg = compose_config(["+experiment=eit_rma", "operator.h0=0.2", "net.n_iter=2", "train.device=cuda"])
    operator, _, model = build_problem(cfg, device="cuda")
    sigma = torch.ones(4, operator.n_elems, dtype=torch.float64, device="cuda")
    y = operator(1.1 * sigma).float()
    loss = (model(y, sigma.float()) - sigma.float()).square().mean()
    loss.backward()
    assert all(p.grad.device.type == "cuda" for p in model.parameters() if p.grad is not None)


def test_complete_electrode_model_on_cuda_matches_cpu():
    """The CEM (sparse Cholesky with the electrode unknowns last) on the GPU: forward, misfit gradient and the
    backward of forward against the CPU. Not yet run on a GPU (no device in the sessions so far): the
    tolerances are the point-electrode operator's."""
    from deepunroll.operators.eit.cem import CompleteElectrodeModel
    from deepunroll.operators.eit.mesh import build_electrode_disk_mesh

    nodes, elements, faces = build_electrode_disk_mesh(16, 0.1, 0.2)
    pattern = torch.eye(16, dtype=torch.float64) - torch.roll(torch.eye(16, dtype=torch.float64), 1, dims=0)
    cpu = CompleteElectrodeModel(nodes, elements, faces, pattern.numpy(), pattern.numpy(), 0.05)
    gpu = CompleteElectrodeModel(nodes, elements, faces, pattern.numpy(), pattern.numpy(), 0.05, device="cuda")
    x = 1 + 0.5 * torch.rand(6, elements.shape[0], dtype=torch.float64)
    y = cpu(1.1 * x)
    assert gpu(x.cuda()).device.type == "cuda"
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gpu.misfit_grad(x.cuda(), y.cuda()).cpu(), cpu.misfit_grad(x, y), rtol=1e-9, atol=1e-14)
    xg = x.cuda().requires_grad_()
    (grad,) = torch.autograd.grad(gpu(xg).square().sum(), xg)
    torch.testing.assert_close(grad.cpu(), cpu.vjp(x, 2 * cpu(x)), rtol=1e-9, atol=1e-14)


def test_mesh_block_and_mesh_lstm_on_cuda_match_cpu():
    """The mesh convolutions (stencil gather and batched product) on the GPU against the CPU, float64."""
    from deepunroll.nets.mesh_conv import MeshBlock, MeshLSTMAccelerator

    mesh = EIT(h0=0.2).element_mesh()
    torch.manual_seed(0)
    block, accel = MeshBlock(mesh, 3, 1, 8, 3).double(), MeshLSTMAccelerator(4, mesh).double()
    x = torch.randn(2, 3, mesh[1].shape[0], dtype=torch.float64)
    d = x[:, 0]
    v_cpu, _ = accel(d, accel.init_state(d))
    out_cpu = block(x)
    block, accel = block.to("cuda"), accel.to("cuda")
    v_gpu, _ = accel(d.cuda(), accel.init_state(d.cuda()))
    torch.testing.assert_close(block(x.cuda()).cpu(), out_cpu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v_gpu.cpu(), v_cpu, rtol=1e-10, atol=1e-12)

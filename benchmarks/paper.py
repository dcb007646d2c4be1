"""ACON-C and Meta-ACON-C as the paper's public code computes them: the
baseline the fused op and modules are measured against."""

import torch

import acon_cuda


def paper_acon_c(x, p1, p2, beta, channel_dim):
    """ACON-C as the paper's public code writes it (AconC.forward), in x's
    dtype: (p1*x - p2*x) * sigmoid(beta * (p1*x - p2*x)) + p2*x."""
    shape = [1] * x.dim()
    shape[channel_dim] = x.shape[channel_dim]
    beta_shape = list(shape)
    if beta.numel() != x.shape[channel_dim]:
        beta_shape[0] = x.shape[0]
    p1, p2, beta = (t.reshape(s).to(x.dtype) for t, s in ((p1, shape), (p2, shape), (beta, beta_shape)))
    dpx = p1 * x - p2 * x
    return dpx * torch.sigmoid(beta * dpx) + p2 * x


class PaperAconC(acon_cuda.AconC):
    """AconC computed as the paper's public code does (``paper_acon_c``)."""

    def forward(self, x):
        self._check_input(x)
        return paper_acon_c(x, self.p1, self.p2, self.beta, self.channel_dim)


class PaperMetaAconC(acon_cuda.MetaAconC):
    """MetaAconC computed as the paper's public code does: the generator's
    1x1 convolutions and BatchNorm2d on the (N, C, 1, 1) mean, and
    ``paper_acon_c``."""

    def forward(self, x):
        self._check_input(x)
        mean = x.mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
        beta = torch.sigmoid(self.bn2(self.fc2(self.bn1(self.fc1(mean)))))
        return paper_acon_c(x, self.p1, self.p2, beta, 1)

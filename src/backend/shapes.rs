//! Shape types the backends share: what a caller describes once and every backend computes.

/// The shape of a (possibly batched) row-major product `C[m, n] = op(A)[m, k] · op(B)[k, n]`.
/// Every matrix is dense row-major; `trans_a` means A is stored as [k, m], `trans_b` that B is
/// stored as [n, k] (a PyTorch Linear weight). Batches are `batch` products at element strides
/// `stride_a/b/c` (0 for a matrix shared by all batches).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl GemmShape {
    /// One product with no transposes.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        GemmShape { m, n, k, trans_a: false, trans_b: false, batch: 1, stride_a: 0, stride_b: 0, stride_c: 0 }
    }

    /// A PyTorch Linear: `y[m, n] = x[m, k] · w[n, k]ᵀ`.
    pub fn linear(m: usize, k: usize, n: usize) -> Self {
        GemmShape { trans_b: true, ..Self::new(m, n, k) }
    }

    /// `batch` products with dense strides (each batch's matrices follow each other).
    pub fn batched(mut self, batch: usize) -> Self {
        self.batch = batch;
        self.stride_a = self.m * self.k;
        self.stride_b = self.k * self.n;
        self.stride_c = self.m * self.n;
        self
    }

    pub(crate) fn elements_needed(rows: usize, cols: usize, batch: usize, stride: usize) -> usize {
        if rows * cols == 0 {
            return 0;
        }
        stride * (batch - 1) + rows * cols
    }
}

/// Geometry of a 2-D convolution (groups = 1, dilation = 1), shared by conv2d and
/// conv_transpose2d. `in_*` is the op's input: for conv_transpose2d the `in_channels` planes of
/// `in_h x in_w` are spread to `out_channels` planes of `transpose_out_h x transpose_out_w`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dShape {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    /// Square kernel, `kernel x kernel`.
    pub kernel: usize,
    pub stride: usize,
    /// Zero padding, the same on all four sides.
    pub padding: usize,
}

/// PyTorch's conv output size `floor((n + 2p - k) / s) + 1`.
fn conv_out(n: usize, k: usize, s: usize, p: usize) -> usize {
    assert!(s > 0, "conv: stride 0");
    assert!(n + 2 * p >= k, "conv: kernel {k} larger than padded input {n} + 2*{p}");
    (n + 2 * p - k) / s + 1
}

/// conv_transpose2d output size `(n - 1)·s - 2p + k` (output_padding 0).
fn transpose_out(n: usize, k: usize, s: usize, p: usize) -> usize {
    assert!(n > 0, "conv_transpose: empty input");
    let full = (n - 1) * s + k;
    assert!(full > 2 * p, "conv_transpose: padding {p} leaves no output");
    full - 2 * p
}

impl Conv2dShape {
    /// conv2d output height.
    pub fn out_h(&self) -> usize {
        conv_out(self.in_h, self.kernel, self.stride, self.padding)
    }

    /// conv2d output width.
    pub fn out_w(&self) -> usize {
        conv_out(self.in_w, self.kernel, self.stride, self.padding)
    }

    /// conv_transpose2d output height: `(in_h - 1)·stride - 2·padding + kernel`.
    pub fn transpose_out_h(&self) -> usize {
        transpose_out(self.in_h, self.kernel, self.stride, self.padding)
    }

    /// conv_transpose2d output width.
    pub fn transpose_out_w(&self) -> usize {
        transpose_out(self.in_w, self.kernel, self.stride, self.padding)
    }

    /// Weight element count: conv2d `[out, in, k, k]`, conv_transpose2d `[in, out, k, k]`.
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.in_channels * self.kernel * self.kernel
    }
}

/// Shape of a BatchNorm input: `[batch, channels, plane]` with `plane = height·width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BnShape {
    pub batch: usize,
    pub channels: usize,
    pub plane: usize,
}

/// A resampling of `planes` independent planes from `in_h x in_w` to `out_h x out_w` (bilinear
/// resize, adaptive average pooling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeShape {
    pub planes: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl ResizeShape {
    /// Elements of the input.
    pub fn in_len(&self) -> usize {
        self.planes * self.in_h * self.in_w
    }

    /// Elements of the output.
    pub fn out_len(&self) -> usize {
        self.planes * self.out_h * self.out_w
    }
}

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    pub fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// The geometry of one patch embedding: `Conv2d(C, D, kernel = stride = patch)` over
/// `[batch, C, height, width]` pixels, as patch rows `[batch·N, C·ph·pw]` and a GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchEmbedShape {
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub patch_h: usize,
    pub patch_w: usize,
    /// D, the conv's output channels (hidden size).
    pub hidden: usize,
}

impl PatchEmbedShape {
    pub fn grid(&self) -> (usize, usize) {
        (self.height / self.patch_h, self.width / self.patch_w)
    }

    /// Patches per image, N.
    pub fn num_patches(&self) -> usize {
        let (gh, gw) = self.grid();
        gh * gw
    }

    /// Elements of one patch row, C·ph·pw.
    pub fn patch_len(&self) -> usize {
        self.channels * self.patch_h * self.patch_w
    }
}

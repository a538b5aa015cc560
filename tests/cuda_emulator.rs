//! Runs the CUDA kernels of `cuda/` on the CPU, in the host emulator (`tests/cuda_emu`, every CUDA
//! thread a fiber with real barrier and shuffle rendezvous), against naive f64 references: the
//! check of the kernels' indexing, tiling, masking and synchronisation that CPU-only CI can do.
//! On a GPU, tests/cuda_kernels.rs compares the same kernels with the CPU backend.
//! Needs a C++17 compiler (`$CXX`, else g++), as the C API tests do.

use std::process::Command;

#[test]
fn cuda_kernels_pass_in_the_host_emulator() {
    let root = env!("CARGO_MANIFEST_DIR");
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let out = Command::new("sh")
        .arg(format!("{root}/scripts/emulate-kernels"))
        .arg("--quick")
        .env("TMPDIR", tmp.path())
        .output()
        .expect("running scripts/emulate-kernels (needs sh and a C++ compiler)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(out.status.success(), "the emulated kernels failed (see above)");
    assert!(stdout.contains("all passed") && !stdout.contains("FAIL"), "unexpected emulator output");
    // Every kernel family was exercised.
    for family in [
        "layernorm_forward",
        "layernorm_backward",
        "residual_layernorm",
        "cross_entropy",
        "attention",
        "relpos",
        "im2col",
        "col2im",
        "image_relu",
        "image_max_pool2x2",
        "image_bilinear",
        "image_adaptive_avg_pool",
        "image_batch_norm",
        "image_transpose",
        "image_pixel_cross_entropy",
        "relax_chacha8",
        "relax_gumbel_softmax",
        "relax_kl_to_uniform",
        "relax_argmax_rows",
        "column_sums",
        "row_sums",
        "channel_sums",
        "tokens_assemble",
        "tokens_embed_backward_rows",
        "tokens_embed_param_grads",
        "tokens_gather_rows",
        "tokens_scatter_rows",
        "tokens_mean_patches",
        "tokens_mean_patches_backward",
        "mse",
        "residual_forward",
        "residual_backward",
    ] {
        assert!(stdout.contains(family), "no {family} case ran");
    }
}

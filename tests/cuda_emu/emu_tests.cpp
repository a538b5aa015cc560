// Runs the kernels of cuda/ in the host emulator (emu.h) against naive double-precision
// references written from the definitions, in f32 and bf16 storage. Built and run by
// scripts/emulate-kernels. Sizes are small (the emulator runs every CUDA thread as a fiber)
// but cover several tiles, partial tiles and odd sizes.
//
// Tolerances: f32 storage: max |got − want| ≤ 1e-5 · max |want| per tensor (f32 arithmetic
// against a double reference). bf16 storage: the reference is computed from the same
// bf16-rounded inputs, so the error is the output rounding (2^-9 relative) plus f32 arithmetic:
// 1e-2 · max |want| per tensor (worst cases, e.g. dx of layer norm re-reading bf16 x, stay
// below half of that).

#include "emu.h"
#include "common.cuh"  // found through -Icuda, as NVRTC finds it as a named header

#include "../../cuda/attention.cu"
#include "../../cuda/conv.cu"
#include "../../cuda/cross_entropy.cu"
#include "../../cuda/image.cu"
#include "../../cuda/relaxation.cu"
#include "../../cuda/layernorm.cu"
#include "../../cuda/mse.cu"
#include "../../cuda/reduce.cu"
#include "../../cuda/residual.cu"
#include "../../cuda/tokens.cu"

#include <string>

static int failures = 0;

struct Rng {
    uint64_t s;
    float uniform(float lo, float hi) {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        const double u = (double)((s * 0x2545F4914F6CDD1DULL) >> 40) / (double)(1ULL << 24);
        return lo + (hi - lo) * (float)u;
    }
    std::vector<float> vec(size_t n, float lo, float hi) {
        std::vector<float> v(n);
        for (auto& x : v) x = uniform(lo, hi);
        return v;
    }
};

// Storage conversions: the test's float data becomes T, and back.
template <typename T> std::vector<T> store(const std::vector<float>& v);
template <> std::vector<float> store<float>(const std::vector<float>& v) { return v; }
template <> std::vector<bf16> store<bf16>(const std::vector<float>& v) {
    std::vector<bf16> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = __float2bfloat16_rn(v[i]);
    return o;
}
static std::vector<double> load(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }
static std::vector<double> load(const std::vector<bf16>& v) {
    std::vector<double> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = __bfloat162float(v[i]);
    return o;
}

template <typename T> const char* tname();
template <> const char* tname<float>() { return "f32"; }
template <> const char* tname<bf16>() { return "bf16"; }
template <typename T> double tol() { return sizeof(T) == 4 ? 1e-5 : 1e-2; }

static void check(const std::string& name, const std::vector<double>& got, const std::vector<double>& want, double rtol) {
    if (got.size() != want.size()) {
        printf("FAIL %s: length %zu vs %zu\n", name.c_str(), got.size(), want.size());
        failures++;
        return;
    }
    double scale = 0, err = 0;
    size_t worst = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        scale = std::max(scale, std::fabs(want[i]));
        const double e = std::fabs(got[i] - want[i]);
        if (!(e <= err)) {  // NaN counts as the worst
            err = std::isnan(e) ? INFINITY : e;
            worst = i;
        }
    }
    const double rel = err / std::max(scale, 1e-30);
    const bool ok = rel <= rtol && scale > 0;
    printf("%s %s: max err %.3e of max %.3e (rel %.2e, tol %.0e) at %zu\n", ok ? "ok  " : "FAIL", name.c_str(), err,
           scale, rel, rtol, worst);
    if (!ok) failures++;
}

static emu_dim3 grid(unsigned x, unsigned y = 1, unsigned z = 1) { return emu_dim3{x, y, z}; }

// ---------------------------------------------------------------- layer norm
static void ln_ref(const std::vector<double>& x, const std::vector<double>& g, const std::vector<double>& b, int rows,
                   int dim, double eps, std::vector<double>& out, std::vector<double>& mean, std::vector<double>& rstd) {
    out.assign(x.size(), 0);
    mean.assign(rows, 0);
    rstd.assign(rows, 0);
    for (int r = 0; r < rows; ++r) {
        double m = 0, v = 0;
        for (int c = 0; c < dim; ++c) m += x[r * dim + c];
        m /= dim;
        for (int c = 0; c < dim; ++c) v += (x[r * dim + c] - m) * (x[r * dim + c] - m);
        v /= dim;
        const double rs = 1.0 / std::sqrt(v + eps);
        mean[r] = m;
        rstd[r] = rs;
        for (int c = 0; c < dim; ++c) out[r * dim + c] = (x[r * dim + c] - m) * rs * g[c] + b[c];
    }
}

template <typename T> void test_layernorm(int rows, int dim, uint64_t seed) {
    Rng rng{seed};
    const float eps = 1e-6f;
    auto x = store<T>(rng.vec((size_t)rows * dim, -2, 3));
    auto g = store<T>(rng.vec(dim, 0.5, 1.5));
    auto b = store<T>(rng.vec(dim, -0.5, 0.5));
    std::vector<T> out(x.size());
    std::vector<float> mean(rows), rstd(rows);
    const int threads = 128;
    emu::launch(grid((rows + 3) / 4), threads, [&] {
        if constexpr (sizeof(T) == 4)
            beit_layernorm_forward_f32(out.data(), mean.data(), rstd.data(), x.data(), g.data(), b.data(), rows, dim, eps);
        else
            beit_layernorm_forward_bf16(out.data(), mean.data(), rstd.data(), x.data(), g.data(), b.data(), rows, dim, eps);
    });
    std::vector<double> ro, rm, rr;
    ln_ref(load(x), load(g), load(b), rows, dim, eps, ro, rm, rr);
    const std::string tag = std::string("layernorm_forward ") + tname<T>() + " " + std::to_string(rows) + "x" + std::to_string(dim);
    check(tag + " out", load(out), ro, tol<T>());
    check(tag + " mean", load(mean), rm, 1e-5);
    check(tag + " rstd", load(rstd), rr, 1e-5);

    // Backward: dx (overwrite and accumulate) and the parameter sums (accumulated onto 0.25).
    auto dy = store<T>(rng.vec(x.size(), -1, 1));
    auto dx0 = store<T>(rng.vec(x.size(), -1, 1));
    const std::vector<double> xd = load(x), gd = load(g), dyd = load(dy), dx0d = load(dx0);
    std::vector<double> want_dx(x.size()), want_dg(dim, 0.25), want_db(dim, 0.25);
    for (int r = 0; r < rows; ++r) {
        double sg = 0, sgx = 0;
        for (int c = 0; c < dim; ++c) {
            const double xh = (xd[r * dim + c] - rm[r]) * rr[r];
            const double gg = dyd[r * dim + c] * gd[c];
            sg += gg;
            sgx += gg * xh;
            want_dg[c] += dyd[r * dim + c] * xh;
            want_db[c] += dyd[r * dim + c];
        }
        for (int c = 0; c < dim; ++c) {
            const double xh = (xd[r * dim + c] - rm[r]) * rr[r];
            want_dx[r * dim + c] = rr[r] * (dyd[r * dim + c] * gd[c] - sg / dim - xh * sgx / dim);
        }
    }
    for (int accumulate = 0; accumulate < 2; ++accumulate) {
        std::vector<T> dx = accumulate ? dx0 : std::vector<T>(x.size());
        const int blocks = (rows + LN_BWD_ROWS - 1) / LN_BWD_ROWS;
        std::vector<float> partials((size_t)blocks * 2 * dim, NAN), dg(dim, 0.25f), db(dim, 0.25f);
        emu::launch(grid(blocks), 96, [&] {
            if constexpr (sizeof(T) == 4)
                beit_layernorm_backward_f32(dx.data(), partials.data(), dy.data(), x.data(), g.data(), mean.data(),
                                       rstd.data(), rows, dim, accumulate);
            else
                beit_layernorm_backward_bf16(dx.data(), partials.data(), dy.data(), x.data(), g.data(), mean.data(),
                                        rstd.data(), rows, dim, accumulate);
        });
        emu::launch(grid((dim + 63) / 64), 64,
                    [&] { beit_layernorm_backward_reduce(dg.data(), db.data(), partials.data(), blocks, dim); });
        std::vector<double> wdx = want_dx;
        if (accumulate)
            for (size_t i = 0; i < wdx.size(); ++i) wdx[i] += dx0d[i];
        const std::string t = std::string("layernorm_backward ") + tname<T>() + (accumulate ? " acc " : " ") +
                              std::to_string(rows) + "x" + std::to_string(dim);
        check(t + " dx", load(dx), wdx, tol<T>());
        check(t + " dgamma", load(dg), want_dg, 1e-5);
        check(t + " dbeta", load(db), want_db, 1e-5);
    }
}

template <typename T> void test_residual_layernorm(int rows, int dim, bool with_all, uint64_t seed) {
    Rng rng{seed};
    const float eps = 1e-5f;
    auto x = store<T>(rng.vec((size_t)rows * dim, -2, 2));
    auto y = store<T>(rng.vec((size_t)rows * dim, -2, 2));
    auto bias = store<T>(rng.vec(dim, -0.5, 0.5));
    auto scale = store<T>(rng.vec(dim, 0.1, 1.5));
    auto g = store<T>(rng.vec(dim, 0.5, 1.5));
    auto b = store<T>(rng.vec(dim, -0.5, 0.5));
    const int rows_each = 3;
    std::vector<float> factors((rows + rows_each - 1) / rows_each);
    for (size_t i = 0; i < factors.size(); ++i) factors[i] = i % 3 == 0 ? 0.0f : 1.25f;
    std::vector<T> resid(x.size()), out(x.size());
    std::vector<float> mean(rows), rstd(rows);
    emu::launch(grid((rows + 1) / 2), 64, [&] {
        const T* bp = with_all ? bias.data() : nullptr;
        const T* sp = with_all ? scale.data() : nullptr;
        const float* fp = with_all ? factors.data() : nullptr;
        if constexpr (sizeof(T) == 4)
            beit_layernorm_residual_forward_f32(resid.data(), out.data(), mean.data(), rstd.data(), x.data(), y.data(), bp,
                                           sp, fp, rows_each, g.data(), b.data(), rows, dim, eps);
        else
            beit_layernorm_residual_forward_bf16(resid.data(), out.data(), mean.data(), rstd.data(), x.data(), y.data(), bp,
                                            sp, fp, rows_each, g.data(), b.data(), rows, dim, eps);
    });
    const auto xd = load(x), yd = load(y), bd = load(bias), sd = load(scale);
    std::vector<double> want_resid(x.size());
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < dim; ++c) {
            const size_t i = (size_t)r * dim + c;
            want_resid[i] = with_all ? xd[i] + sd[c] * factors[r / rows_each] * (yd[i] + bd[c]) : xd[i] + yd[i];
        }
    std::vector<double> ro, rm, rr;
    // The kernel normalises the stored (rounded) residual: so does the reference.
    ln_ref(load(resid), load(g), load(b), rows, dim, eps, ro, rm, rr);
    const std::string tag = std::string("residual_layernorm ") + tname<T>() + (with_all ? " bias+scale+factors " : " plain ") +
                            std::to_string(rows) + "x" + std::to_string(dim);
    check(tag + " resid", load(resid), want_resid, tol<T>());
    check(tag + " out", load(out), ro, tol<T>());
    check(tag + " rstd", load(rstd), rr, 1e-5);
}

// ---------------------------------------------------------------- cross-entropy
template <typename T> void test_cross_entropy(int rows, int vocab, float smoothing, uint64_t seed) {
    Rng rng{seed};
    auto logits = store<T>(rng.vec((size_t)rows * vocab, -4, 4));
    std::vector<int> labels(rows);
    int counted = 0;
    for (int r = 0; r < rows; ++r) {
        labels[r] = r % 4 == 2 ? -100 : (int)((r * 7919 + 13) % vocab);
        counted += labels[r] >= 0;
    }
    const auto x = load(logits);
    const double inv = 1.0 / counted;
    std::vector<double> want_grad(x.size(), 0.0), want_loss(rows, 0.0);
    double want_sum = 0;
    for (int r = 0; r < rows; ++r) {
        if (labels[r] < 0) continue;
        const double* row = &x[(size_t)r * vocab];
        double m = -INFINITY, s = 0, sx = 0;
        for (int c = 0; c < vocab; ++c) m = std::max(m, row[c]);
        for (int c = 0; c < vocab; ++c) {
            s += std::exp(row[c] - m);
            sx += row[c];
        }
        const double lse = m + std::log(s);
        want_loss[r] = lse - (1 - smoothing) * row[labels[r]] - smoothing * sx / vocab;
        want_sum += want_loss[r];
        for (int c = 0; c < vocab; ++c) {
            const double t = (c == labels[r] ? 1 - smoothing : 0) + smoothing / vocab;
            want_grad[(size_t)r * vocab + c] = (std::exp(row[c] - lse) - t) * inv;
        }
    }
    std::vector<float> losses(rows, NAN);
    std::vector<double> sum(1, 0.5);  // the sum is added to what the buffer holds
    emu::launch(grid(rows), 256, [&] {
        if constexpr (sizeof(T) == 4)
            beit_cross_entropy_forward_backward_f32(logits.data(), losses.data(), labels.data(), rows, vocab, (float)inv,
                                               smoothing);
        else
            beit_cross_entropy_forward_backward_bf16(logits.data(), losses.data(), labels.data(), rows, vocab, (float)inv,
                                                smoothing);
    });
    emu::launch(grid(1), CE_SUM_THREADS, [&] { beit_cross_entropy_loss_sum(sum.data(), losses.data(), rows); });
    const std::string tag = std::string("cross_entropy ") + tname<T>() + " " + std::to_string(rows) + "x" +
                            std::to_string(vocab) + " smoothing " + std::to_string(smoothing);
    check(tag + " grad", load(logits), want_grad, tol<T>());
    check(tag + " losses", load(losses), want_loss, 1e-5);
    check(tag + " loss sum", sum, {0.5 + want_sum}, 1e-5);
}

// ---------------------------------------------------------------- attention
struct AttShape {
    int batch, n, heads, d;
};

// Naive attention from the definition in double: ctx, lse, and (for dctx) dq, dk, dv, dbias.
static void attention_ref(const std::vector<double>& qkv, const std::vector<double>* bias, const std::vector<double>& dctx,
                          AttShape s, std::vector<double>& ctx, std::vector<double>& lse, std::vector<double>& dqkv,
                          std::vector<double>& dbias) {
    const int n = s.n, d = s.d, hd = s.heads * s.d;
    const double scale = 1.0 / std::sqrt((double)d);
    ctx.assign((size_t)s.batch * n * hd, 0);
    lse.assign((size_t)s.batch * s.heads * n, 0);
    dqkv.assign(qkv.size(), 0);
    dbias.assign((size_t)s.heads * n * n, 0);
    auto at = [&](int b, int t, int part, int h, int c) { return ((size_t)b * n + t) * 3 * hd + part * hd + h * d + c; };
    std::vector<double> p((size_t)n * n), dp((size_t)n * n);
    for (int b = 0; b < s.batch; ++b)
        for (int h = 0; h < s.heads; ++h) {
            for (int i = 0; i < n; ++i) {
                double m = -INFINITY;
                for (int j = 0; j < n; ++j) {
                    double dot = 0;
                    for (int c = 0; c < d; ++c) dot += qkv[at(b, i, 0, h, c)] * qkv[at(b, j, 1, h, c)];
                    p[i * n + j] = scale * dot + (bias ? (*bias)[((size_t)h * n + i) * n + j] : 0);
                    m = std::max(m, p[i * n + j]);
                }
                double z = 0;
                for (int j = 0; j < n; ++j) z += std::exp(p[i * n + j] - m);
                lse[((size_t)b * s.heads + h) * n + i] = m + std::log(z);
                for (int j = 0; j < n; ++j) p[i * n + j] = std::exp(p[i * n + j] - m) / z;
                for (int c = 0; c < d; ++c) {
                    double acc = 0;
                    for (int j = 0; j < n; ++j) acc += p[i * n + j] * qkv[at(b, j, 2, h, c)];
                    ctx[((size_t)b * n + i) * hd + h * d + c] = acc;
                }
            }
            auto dO = [&](int i, int c) { return dctx[((size_t)b * n + i) * hd + h * d + c]; };
            for (int i = 0; i < n; ++i) {
                double rowdot = 0;
                for (int j = 0; j < n; ++j) {
                    double v = 0;
                    for (int c = 0; c < d; ++c) v += dO(i, c) * qkv[at(b, j, 2, h, c)];
                    dp[i * n + j] = v;
                    rowdot += v * p[i * n + j];
                }
                for (int j = 0; j < n; ++j) {
                    const double ds = p[i * n + j] * (dp[i * n + j] - rowdot);
                    dbias[((size_t)h * n + i) * n + j] += ds;
                    for (int c = 0; c < d; ++c) {
                        dqkv[at(b, i, 0, h, c)] += scale * ds * qkv[at(b, j, 1, h, c)];
                        dqkv[at(b, j, 1, h, c)] += scale * ds * qkv[at(b, i, 0, h, c)];
                    }
                }
                for (int j = 0; j < n; ++j)
                    for (int c = 0; c < d; ++c) dqkv[at(b, j, 2, h, c)] += p[i * n + j] * dO(i, c);
            }
        }
}

template <typename T, int D> void test_attention(AttShape s, bool with_bias, int per_group, uint64_t seed) {
    Rng rng{seed};
    const int n = s.n, hd = s.heads * D;
    const float scale = 1.0f / std::sqrt((float)D);
    auto qkv = store<T>(rng.vec((size_t)s.batch * n * 3 * hd, -1.5, 1.5));
    std::vector<float> bias = rng.vec((size_t)s.heads * n * n, -1, 1);
    auto dctx = store<T>(rng.vec((size_t)s.batch * n * hd, -1, 1));
    const float* bp = with_bias ? bias.data() : nullptr;
    std::vector<T> ctx((size_t)s.batch * n * hd), dqkv(qkv.size());
    std::vector<float> lse((size_t)s.batch * s.heads * n), delta(lse.size());
    const unsigned tiles = (n + ATT_TILE - 1) / ATT_TILE;
    emu::launch(grid(tiles, s.heads, s.batch), ATT_THREADS, [&] {
        if constexpr (sizeof(T) == 4) {
            if constexpr (D == 32) beit_attention_forward_d32_f32(ctx.data(), lse.data(), qkv.data(), bp, n, s.heads, scale);
            else beit_attention_forward_d64_f32(ctx.data(), lse.data(), qkv.data(), bp, n, s.heads, scale);
        } else {
            if constexpr (D == 32) beit_attention_forward_d32_bf16(ctx.data(), lse.data(), qkv.data(), bp, n, s.heads, scale);
            else beit_attention_forward_d64_bf16(ctx.data(), lse.data(), qkv.data(), bp, n, s.heads, scale);
        }
    });
    const size_t rows = (size_t)s.batch * s.heads * n;
    emu::launch(grid((unsigned)((rows + 3) / 4)), 128, [&] {
        if constexpr (sizeof(T) == 4) beit_attention_backward_delta_f32(delta.data(), ctx.data(), dctx.data(), s.batch, n, s.heads, D);
        else beit_attention_backward_delta_bf16(delta.data(), ctx.data(), dctx.data(), s.batch, n, s.heads, D);
    });
    emu::launch(grid(tiles, s.heads, s.batch), ATT_THREADS, [&] {
        if constexpr (sizeof(T) == 4) {
            if constexpr (D == 32) beit_attention_backward_dkdv_d32_f32(dqkv.data(), qkv.data(), dctx.data(), bp, lse.data(), delta.data(), n, s.heads, scale);
            else beit_attention_backward_dkdv_d64_f32(dqkv.data(), qkv.data(), dctx.data(), bp, lse.data(), delta.data(), n, s.heads, scale);
        } else {
            if constexpr (D == 32) beit_attention_backward_dkdv_d32_bf16(dqkv.data(), qkv.data(), dctx.data(), bp, lse.data(), delta.data(), n, s.heads, scale);
            else beit_attention_backward_dkdv_d64_bf16(dqkv.data(), qkv.data(), dctx.data(), bp, lse.data(), delta.data(), n, s.heads, scale);
        }
    });
    const int groups = (s.batch + per_group - 1) / per_group;
    std::vector<float> part((size_t)groups * s.heads * n * n, NAN);
    float* pp = with_bias ? part.data() : nullptr;
    emu::launch(grid(tiles, s.heads, groups), ATT_THREADS, [&] {
        if constexpr (sizeof(T) == 4) {
            if constexpr (D == 32) beit_attention_backward_dq_d32_f32(dqkv.data(), pp, qkv.data(), dctx.data(), bp, lse.data(), delta.data(), s.batch, per_group, n, s.heads, scale);
            else beit_attention_backward_dq_d64_f32(dqkv.data(), pp, qkv.data(), dctx.data(), bp, lse.data(), delta.data(), s.batch, per_group, n, s.heads, scale);
        } else {
            if constexpr (D == 32) beit_attention_backward_dq_d32_bf16(dqkv.data(), pp, qkv.data(), dctx.data(), bp, lse.data(), delta.data(), s.batch, per_group, n, s.heads, scale);
            else beit_attention_backward_dq_d64_bf16(dqkv.data(), pp, qkv.data(), dctx.data(), bp, lse.data(), delta.data(), s.batch, per_group, n, s.heads, scale);
        }
    });
    std::vector<double> bias_d(bias.begin(), bias.end());
    std::vector<double> rctx, rlse, rdqkv, rdbias;
    attention_ref(load(qkv), with_bias ? &bias_d : nullptr, load(dctx), AttShape{s.batch, n, s.heads, D}, rctx, rlse, rdqkv, rdbias);
    const std::string tag = std::string("attention ") + tname<T>() + " b" + std::to_string(s.batch) + " n" +
                            std::to_string(n) + " h" + std::to_string(s.heads) + " d" + std::to_string(D) +
                            (with_bias ? " bias" : " nobias") + " group" + std::to_string(per_group);
    check(tag + " ctx", load(ctx), rctx, tol<T>());
    check(tag + " lse", load(lse), rlse, 1e-5);
    // dq, dk, dv separately, so one cannot hide behind another's scale.
    for (int part_i = 0; part_i < 3; ++part_i) {
        std::vector<double> got, want;
        const auto all = load(dqkv);
        for (size_t i = 0; i < all.size(); ++i)
            if ((int)((i % (3 * hd)) / hd) == part_i) {
                got.push_back(all[i]);
                want.push_back(rdqkv[i]);
            }
        check(tag + (part_i == 0 ? " dq" : part_i == 1 ? " dk" : " dv"), got, want, tol<T>() * (sizeof(T) == 4 ? 2 : 1));
    }
    if (with_bias) {
        std::vector<float> dbias((size_t)s.heads * n * n, 0.5f);
        const int len = s.heads * n * n;
        emu::launch(grid((len + 127) / 128), 128, [&] { beit_attention_dbias_reduce(dbias.data(), part.data(), groups, len, 1); });
        for (auto& v : rdbias) v += 0.5;
        // bf16: Δ comes from the bf16-rounded ctx, so dS carries that rounding too.
        check(tag + " dbias", load(dbias), rdbias, sizeof(T) == 4 ? 2e-5 : 1e-2);
    }
}

static void test_relpos(int gh, int gw, int heads) {
    // Index as src/model/relpos.rs builds it (the spec's rule), table [M, heads].
    const int np = gh * gw, t = np + 1, m = (2 * gh - 1) * (2 * gw - 1) + 3;
    std::vector<int> index((size_t)t * t);
    for (int i = 0; i < np; ++i)
        for (int j = 0; j < np; ++j)
            index[(i + 1) * t + j + 1] = (i / gw - j / gw + gh - 1) * (2 * gw - 1) + (i % gw - j % gw + gw - 1);
    for (int j = 0; j < t; ++j) {
        index[j] = m - 3;
        index[j * t] = m - 2;
    }
    index[0] = m - 1;
    Rng rng{99};
    auto table = rng.vec((size_t)m * heads, -1, 1);
    std::vector<float> bias((size_t)heads * t * t, 0.25f);
    emu::launch(grid((heads * t * t + 127) / 128), 128,
                [&] { beit_attention_relpos_gather_f32(bias.data(), table.data(), index.data(), heads, t * t, 1); });
    std::vector<double> want(bias.size());
    for (int h = 0; h < heads; ++h)
        for (int p = 0; p < t * t; ++p) want[(size_t)h * t * t + p] = 0.25 + table[(size_t)index[p] * heads + h];
    check("relpos_bias_gather", load(bias), want, 1e-6);
    // The adjoint (each table entry scans the index, pairs in increasing p).
    auto dbias = rng.vec((size_t)heads * t * t, -1, 1);
    std::vector<float> dtable((size_t)m * heads, 0.5f), cpu_order((size_t)m * heads, 0.5f);
    emu::launch(grid((m * heads + 63) / 64), 64, [&] {
        beit_attention_relpos_table_grad(dtable.data(), dbias.data(), index.data(), heads, m, t * t);
    });
    // src/backend/cpu/ops.rs relpos_bias_backward's loop, in f32: the kernel must give its bits.
    for (int h = 0; h < heads; ++h)
        for (int p = 0; p < t * t; ++p) cpu_order[(size_t)index[p] * heads + h] += dbias[(size_t)h * t * t + p];
    const bool same = memcmp(dtable.data(), cpu_order.data(), dtable.size() * 4) == 0;
    printf("%s relpos_table_grad grid %dx%d: bit-identical to the CPU's order\n", same ? "ok  " : "FAIL", gh, gw);
    if (!same) failures++;
}

// ---------------------------------------------------------------- im2col / col2im
template <typename T> void test_im2col(int batch, int ch, int h, int w, int k, int stride, int pad, uint64_t seed) {
    Rng rng{seed};
    const int oh = (h + 2 * pad - k) / stride + 1, ow = (w + 2 * pad - k) / stride + 1;
    const size_t l = (size_t)oh * ow, kk = (size_t)ch * k * k;
    auto img = store<T>(rng.vec((size_t)batch * ch * h * w, -1, 1));
    std::vector<T> cols(batch * kk * l);
    emu::launch(grid(7), 64, [&] {  // fewer threads than elements: exercises the grid-stride loop
        if constexpr (sizeof(T) == 4) beit_conv_im2col_f32(cols.data(), img.data(), batch, ch, h, w, k, stride, pad, oh, ow);
        else beit_conv_im2col_bf16(cols.data(), img.data(), batch, ch, h, w, k, stride, pad, oh, ow);
    });
    const auto x = load(img);
    std::vector<double> want(cols.size());
    for (int b = 0; b < batch; ++b)
        for (int c = 0; c < ch; ++c)
            for (int kh = 0; kh < k; ++kh)
                for (int kw = 0; kw < k; ++kw)
                    for (int oy = 0; oy < oh; ++oy)
                        for (int ox = 0; ox < ow; ++ox) {
                            const int iy = oy * stride - pad + kh, ix = ox * stride - pad + kw;
                            const double v = (iy >= 0 && iy < h && ix >= 0 && ix < w) ? x[(((size_t)b * ch + c) * h + iy) * w + ix] : 0.0;
                            want[((size_t)b * kk + (c * k + kh) * k + kw) * l + oy * ow + ox] = v;
                        }
    const std::string tag = std::string(tname<T>()) + " b" + std::to_string(batch) + " c" + std::to_string(ch) + " " +
                            std::to_string(h) + "x" + std::to_string(w) + " k" + std::to_string(k) + " s" +
                            std::to_string(stride) + " p" + std::to_string(pad);
    check("im2col " + tag, load(cols), want, 0);
    // col2im is the adjoint: a scatter-add of every column element to its pixel, from a start
    // of bias[c] (or the image itself with accumulate).
    auto colv = store<T>(rng.vec(cols.size(), -1, 1));
    auto bias = store<T>(rng.vec(ch, -1, 1));
    for (int mode = 0; mode < 2; ++mode) {
        std::vector<T> out = mode == 1 ? img : std::vector<T>(img.size());
        emu::launch(grid(5), 64, [&] {
            if constexpr (sizeof(T) == 4) beit_conv_col2im_f32(out.data(), colv.data(), mode == 0 ? bias.data() : nullptr, batch, ch, h, w, k, stride, pad, oh, ow, mode);
            else beit_conv_col2im_bf16(out.data(), colv.data(), mode == 0 ? bias.data() : nullptr, batch, ch, h, w, k, stride, pad, oh, ow, mode);
        });
        const auto cv = load(colv), bv = load(bias);
        std::vector<double> wimg(img.size());
        for (size_t i = 0; i < wimg.size(); ++i) wimg[i] = mode == 1 ? x[i] : bv[(i / ((size_t)h * w)) % ch];
        for (int b = 0; b < batch; ++b)
            for (int c = 0; c < ch; ++c)
                for (int kh = 0; kh < k; ++kh)
                    for (int kw = 0; kw < k; ++kw)
                        for (int oy = 0; oy < oh; ++oy)
                            for (int ox = 0; ox < ow; ++ox) {
                                const int iy = oy * stride - pad + kh, ix = ox * stride - pad + kw;
                                if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
                                wimg[(((size_t)b * ch + c) * h + iy) * w + ix] += cv[((size_t)b * kk + (c * k + kh) * k + kw) * l + oy * ow + ox];
                            }
        check(std::string("col2im ") + (mode ? "accumulate " : "bias ") + tag, load(out), wimg, tol<T>());
    }
}

// ---------------------------------------------------------------- reductions
template <typename T> void test_reductions(int rows, int n, uint64_t seed) {
    Rng rng{seed};
    auto x = store<T>(rng.vec((size_t)rows * n, -1, 1));
    const auto xd = load(x);
    const int chunk_rows = 16, chunks = (rows + chunk_rows - 1) / chunk_rows;
    std::vector<float> partials((size_t)chunks * n, NAN), cs(n, 1.0f), rs(rows, NAN);
    emu::launch(grid((n + 31) / 32, chunks), 32, [&] {
        if constexpr (sizeof(T) == 4) beit_reduce_column_sums_partial_f32(partials.data(), x.data(), rows, n, chunk_rows);
        else beit_reduce_column_sums_partial_bf16(partials.data(), x.data(), rows, n, chunk_rows);
    });
    emu::launch(grid((n + 31) / 32), 32, [&] { beit_reduce_column_sums_finish(cs.data(), partials.data(), chunks, n); });
    emu::launch(grid((rows + 1) / 2), 64, [&] {
        if constexpr (sizeof(T) == 4) beit_reduce_row_sums_f32(rs.data(), x.data(), rows, n);
        else beit_reduce_row_sums_bf16(rs.data(), x.data(), rows, n);
    });
    std::vector<double> wc(n, 1.0), wr(rows, 0.0);
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < n; ++c) {
            wc[c] += xd[(size_t)r * n + c];
            wr[r] += xd[(size_t)r * n + c];
        }
    const std::string tag = std::string(tname<T>()) + " " + std::to_string(rows) + "x" + std::to_string(n);
    check("column_sums " + tag, load(cs), wc, 1e-5);
    check("row_sums " + tag, load(rs), wr, 1e-5);
    // The same data as NCHW [batch = rows / 3, channels = 3, plane = n] for channel_sums.
    const int batch = rows / 3, ch = 3;
    std::vector<float> chs(ch, 2.0f);
    emu::launch(grid(ch), 64, [&] {
        if constexpr (sizeof(T) == 4) beit_reduce_channel_sums_f32(chs.data(), x.data(), batch, ch, n);
        else beit_reduce_channel_sums_bf16(chs.data(), x.data(), batch, ch, n);
    });
    std::vector<double> wch(ch, 2.0);
    for (int b = 0; b < batch; ++b)
        for (int c = 0; c < ch; ++c)
            for (int p = 0; p < n; ++p) wch[c] += xd[((size_t)b * ch + c) * n + p];
    check("channel_sums " + tag, load(chs), wch, 1e-5);
}

// ---------------------------------------------------------------- image ops (image.cu)
// ReLU, 2x2 max pooling, bilinear resize, adaptive average pooling and batch norm, forward and
// backward, against the definitions (PyTorch's) written out in double. Every grid is smaller
// than the work (grid-stride loops); backward references scatter, the kernels gather.
static double bilinear_src(int o, int input, int output) {
    return std::max(((double)input / output) * (o + 0.5) - 0.5, 0.0);
}

static void bilinear_ref(const std::vector<double>& x, int planes, int ih, int iw, int oh, int ow,
                         std::vector<double>* y, const std::vector<double>* dy, std::vector<double>* dx) {
    if (y) y->assign((size_t)planes * oh * ow, 0);
    if (dx) dx->assign((size_t)planes * ih * iw, 0);
    for (int p = 0; p < planes; ++p)
        for (int oy = 0; oy < oh; ++oy)
            for (int ox = 0; ox < ow; ++ox) {
                const double sy = bilinear_src(oy, ih, oh), sx = bilinear_src(ox, iw, ow);
                const int y0 = std::min((int)sy, ih - 1), x0 = std::min((int)sx, iw - 1);
                const int y1 = y0 < ih - 1 ? y0 + 1 : y0, x1 = x0 < iw - 1 ? x0 + 1 : x0;
                const double ly = sy - y0, lx = sx - x0;
                const int ys[2] = {y0, y1}, xs[2] = {x0, x1};
                const double wy[2] = {1 - ly, ly}, wx[2] = {1 - lx, lx};
                const size_t o = ((size_t)p * oh + oy) * ow + ox;
                for (int a = 0; a < 2; ++a)
                    for (int b = 0; b < 2; ++b) {
                        const size_t i = ((size_t)p * ih + ys[a]) * iw + xs[b];
                        if (y) (*y)[o] += wy[a] * wx[b] * x[i];
                        if (dx) (*dx)[i] += wy[a] * wx[b] * (*dy)[o];
                    }
            }
}

static void test_image(int batch, int ch, int h, int w, int oh, int ow, uint64_t seed) {
    Rng rng{seed};
    const int planes = batch * ch, plane = h * w;
    const size_t n = (size_t)planes * plane;
    const std::string tag = std::to_string(batch) + "x" + std::to_string(ch) + "x" + std::to_string(h) + "x" +
                            std::to_string(w);
    auto x = rng.vec(n, -1, 1);
    auto dy = rng.vec(n, -1, 1);
    const auto xd = load(x), dyd = load(dy);

    // ReLU forward and backward (accumulating into dx = 1).
    std::vector<float> y(n, NAN), dx(n, 1.0f);
    emu::launch(grid(3), 64, [&] { beit_image_relu(x.data(), y.data(), (long long)n); });
    emu::launch(grid(3), 64, [&] { beit_image_relu_backward(x.data(), dy.data(), dx.data(), (long long)n, 1); });
    std::vector<double> wy(n), wdx(n);
    for (size_t i = 0; i < n; ++i) {
        wy[i] = xd[i] < 0 ? 0 : xd[i];
        wdx[i] = 1.0 + (xd[i] > 0 ? dyd[i] : 0);
    }
    check("image_relu " + tag, load(y), wy, 0);
    check("image_relu_backward " + tag, load(dx), wdx, 1e-7);

    // 2x2 max pooling: the maximum of each window, and the gradient routed to it (overwrite).
    const int ph = h / 2, pw = w / 2;
    const size_t pn = (size_t)planes * ph * pw;
    std::vector<float> py(pn, NAN), pdx(n, NAN);
    std::vector<unsigned> arg(pn, 0xffffffffu);
    auto pdy = rng.vec(pn, -1, 1);
    emu::launch(grid(2), 64, [&] { beit_image_max_pool2x2(x.data(), py.data(), arg.data(), planes, h, w); });
    emu::launch(grid(2), 64, [&] {
        beit_image_max_pool2x2_backward(pdy.data(), arg.data(), pdx.data(), planes, h, w, 0);
    });
    std::vector<double> wpy(pn), wpdx(n, 0.0);
    for (int p = 0; p < planes; ++p)
        for (int i = 0; i < ph; ++i)
            for (int j = 0; j < pw; ++j) {
                size_t best = (size_t)p * plane + 2 * i * w + 2 * j;
                for (size_t c : {best + 1, best + w, best + w + 1})
                    if (xd[c] > xd[best]) best = c;
                const size_t o = ((size_t)p * ph + i) * pw + j;
                wpy[o] = xd[best];
                wpdx[best] = pdy[o];
            }
    check("image_max_pool2x2 " + tag, load(py), wpy, 0);
    check("image_max_pool2x2_backward " + tag, load(pdx), wpdx, 0);

    // Bilinear resize to oh x ow and back (the gradient of a random output).
    const size_t bn = (size_t)planes * oh * ow;
    std::vector<float> by(bn, NAN), bdx(n, NAN);
    auto bdy = rng.vec(bn, -1, 1);
    emu::launch(grid(3), 64, [&] { beit_image_bilinear(x.data(), by.data(), planes, h, w, oh, ow); });
    emu::launch(grid(3), 64, [&] { beit_image_bilinear_backward(bdy.data(), bdx.data(), planes, h, w, oh, ow); });
    std::vector<double> wby, wbdx;
    const auto bdyd = load(bdy);
    bilinear_ref(xd, planes, h, w, oh, ow, &wby, &bdyd, &wbdx);
    check("image_bilinear " + tag, load(by), wby, 1e-6);
    check("image_bilinear_backward " + tag, load(bdx), wbdx, 1e-6);

    // Adaptive average pooling to 3 x 2 (overlapping windows when 3 does not divide h).
    const int ah = 3, aw = 2;
    const size_t an = (size_t)planes * ah * aw;
    std::vector<float> ay(an, NAN), adx(n, NAN);
    auto ady = rng.vec(an, -1, 1);
    emu::launch(grid(1), 32, [&] { beit_image_adaptive_avg_pool(x.data(), ay.data(), planes, h, w, ah, aw); });
    emu::launch(grid(2), 64, [&] { beit_image_adaptive_avg_pool_backward(ady.data(), adx.data(), planes, h, w, ah, aw); });
    std::vector<double> way(an, 0), wadx(n, 0);
    for (int p = 0; p < planes; ++p)
        for (int oy = 0; oy < ah; ++oy)
            for (int ox = 0; ox < aw; ++ox) {
                const int y0 = oy * h / ah, y1 = ((oy + 1) * h + ah - 1) / ah;
                const int x0 = ox * w / aw, x1 = ((ox + 1) * w + aw - 1) / aw;
                const size_t o = ((size_t)p * ah + oy) * aw + ox;
                const double cells = (double)(y1 - y0) * (x1 - x0);
                for (int yy = y0; yy < y1; ++yy)
                    for (int xx = x0; xx < x1; ++xx) {
                        way[o] += xd[(size_t)p * plane + yy * w + xx] / cells;
                        wadx[(size_t)p * plane + yy * w + xx] += ady[o] / cells;
                    }
            }
    check("image_adaptive_avg_pool " + tag, load(ay), way, 1e-6);
    check("image_adaptive_avg_pool_backward " + tag, load(adx), wadx, 1e-6);

    // Batch norm: statistics, training normalisation, backward (dγ, dβ accumulated onto 0.5),
    // evaluation with running statistics, and the running update.
    const float eps = 1e-5f, momentum = 0.1f;
    auto gamma = rng.vec(ch, 0.5, 1.5), beta = rng.vec(ch, -0.5, 0.5);
    std::vector<float> mean(ch, NAN), invstd(ch, NAN), varu(ch, NAN), ny(n, NAN), ndx(n, NAN);
    std::vector<float> dgamma(ch, 0.5f), dbeta(ch, 0.5f);
    std::vector<double> sums(2 * ch, NAN);
    emu::launch(grid(ch), 64, [&] {
        beit_image_batch_norm_stats(x.data(), mean.data(), invstd.data(), varu.data(), batch, ch, plane, eps);
    });
    emu::launch(grid(3), 64, [&] {
        beit_image_batch_norm_apply(x.data(), ny.data(), gamma.data(), beta.data(), mean.data(), invstd.data(), batch,
                                    ch, plane, 0, eps);
    });
    emu::launch(grid(ch), 64, [&] {
        beit_image_batch_norm_backward_sums(x.data(), dy.data(), mean.data(), invstd.data(), sums.data(),
                                            dgamma.data(), dbeta.data(), batch, ch, plane);
    });
    emu::launch(grid(3), 64, [&] {
        beit_image_batch_norm_backward_dx(x.data(), dy.data(), gamma.data(), mean.data(), invstd.data(), sums.data(),
                                          ndx.data(), batch, ch, plane);
    });
    std::vector<float> rmean(ch), rvar(ch), ey(n, NAN);
    for (int c = 0; c < ch; ++c) {
        rmean[c] = 0.1f * c;
        rvar[c] = 1.0f + 0.2f * c;
    }
    const auto rmean0 = rmean, rvar0 = rvar;
    emu::launch(grid(3), 64, [&] {
        beit_image_batch_norm_apply(x.data(), ey.data(), gamma.data(), beta.data(), rmean.data(), rvar.data(), batch,
                                    ch, plane, 1, eps);
    });
    emu::launch(grid(1), 32, [&] {
        beit_image_batch_norm_running_update(rmean.data(), rvar.data(), mean.data(), varu.data(), ch, momentum);
    });
    const double m = (double)batch * plane;
    std::vector<double> wmean(ch), winv(ch), wvaru(ch), wny(n), wndx(n), wdg(ch), wdb(ch), wey(n), wrm(ch), wrv(ch);
    for (int c = 0; c < ch; ++c) {
        double s = 0, sq = 0, sdy = 0, sdyx = 0;
        for (int b = 0; b < batch; ++b)
            for (int i = 0; i < plane; ++i) s += xd[((size_t)b * ch + c) * plane + i];
        const double mu = s / m;
        for (int b = 0; b < batch; ++b)
            for (int i = 0; i < plane; ++i) sq += std::pow(xd[((size_t)b * ch + c) * plane + i] - mu, 2);
        const double is = 1 / std::sqrt(sq / m + eps);
        wmean[c] = mu;
        winv[c] = is;
        wvaru[c] = sq / (m - 1);
        for (int b = 0; b < batch; ++b)
            for (int i = 0; i < plane; ++i) {
                const size_t e = ((size_t)b * ch + c) * plane + i;
                const double xhat = (xd[e] - mu) * is;
                wny[e] = xhat * gamma[c] + beta[c];
                wey[e] = (xd[e] - rmean0[c]) / std::sqrt(rvar0[c] + (double)eps) * gamma[c] + beta[c];
                sdy += dyd[e];
                sdyx += dyd[e] * xhat;
            }
        wdb[c] = 0.5 + sdy;
        wdg[c] = 0.5 + sdyx;
        for (int b = 0; b < batch; ++b)
            for (int i = 0; i < plane; ++i) {
                const size_t e = ((size_t)b * ch + c) * plane + i;
                const double xhat = (xd[e] - mu) * is;
                wndx[e] = gamma[c] * is * (dyd[e] - sdy / m - xhat * sdyx / m);
            }
        wrm[c] = (1 - momentum) * rmean0[c] + momentum * mu;
        wrv[c] = (1 - momentum) * rvar0[c] + momentum * wvaru[c];
    }
    check("image_batch_norm_stats mean " + tag, load(mean), wmean, 1e-6);
    check("image_batch_norm_stats invstd " + tag, load(invstd), winv, 1e-6);
    check("image_batch_norm_stats var " + tag, load(varu), wvaru, 1e-6);
    check("image_batch_norm_apply " + tag, load(ny), wny, 1e-5);
    check("image_batch_norm_eval " + tag, load(ey), wey, 1e-5);
    check("image_batch_norm_backward dx " + tag, load(ndx), wndx, 1e-5);
    check("image_batch_norm_backward dgamma " + tag, load(dgamma), wdg, 1e-6);
    check("image_batch_norm_backward dbeta " + tag, load(dbeta), wdb, 1e-6);
    check("image_batch_norm_running_update " + tag, load(rmean), wrm, 1e-6);
    check("image_batch_norm_running_update var " + tag, load(rvar), wrv, 1e-6);

    // Scale, and the transpose of each image's [ch, plane] to [plane, ch] and back.
    std::vector<float> sc = x, tr(n, NAN), back(n, NAN);
    emu::launch(grid(2), 64, [&] { beit_image_scale(sc.data(), -1.5f, (long long)n); });
    emu::launch(grid(2), 64, [&] { beit_image_transpose(x.data(), tr.data(), batch, ch, plane); });
    emu::launch(grid(2), 64, [&] { beit_image_transpose(tr.data(), back.data(), batch, plane, ch); });
    std::vector<double> wsc(n), wtr(n);
    for (int b = 0; b < batch; ++b)
        for (int c = 0; c < ch; ++c)
            for (int p = 0; p < plane; ++p) {
                const size_t e = ((size_t)b * ch + c) * plane + p;
                wsc[e] = (double)(-1.5f * x[e]);  // the f32 product, rounded as the kernel's
                wtr[((size_t)b * plane + p) * ch + c] = xd[e];
            }
    check("image_scale " + tag, load(sc), wsc, 0);
    check("image_transpose " + tag, load(tr), wtr, 0);
    check("image_transpose back " + tag, load(back), xd, 0);

    // Per-pixel cross-entropy over `ch` classes: every third pixel left out (label ch).
    std::vector<int> labels((size_t)batch * plane);
    for (size_t i = 0; i < labels.size(); ++i) labels[i] = i % 3 == 0 ? ch : (int)(i % ch);
    std::vector<float> lg = x;
    std::vector<double> img_loss(batch, NAN);
    emu::launch(grid(1), 64, [&] {
        beit_image_pixel_cross_entropy(lg.data(), labels.data(), img_loss.data(), batch, ch, plane, 0.5f);
    });
    std::vector<double> wloss(batch, 0.0), wgrad(n, 0.0);
    for (int b = 0; b < batch; ++b)
        for (int p = 0; p < plane; ++p) {
            const int label = labels[(size_t)b * plane + p];
            if (label == ch) continue;
            double z = 0;
            for (int c = 0; c < ch; ++c) z += std::exp(xd[((size_t)b * ch + c) * plane + p]);
            wloss[b] += std::log(z) - xd[((size_t)b * ch + label) * plane + p];
            for (int c = 0; c < ch; ++c) {
                const size_t e = ((size_t)b * ch + c) * plane + p;
                wgrad[e] = 0.5 * (std::exp(xd[e]) / z - (c == label));
            }
        }
    check("image_pixel_cross_entropy loss " + tag, img_loss, wloss, 1e-6);
    check("image_pixel_cross_entropy gradient " + tag, load(lg), wgrad, 1e-6);
}

// ---------------------------------------------------------------- dVAE bottleneck (relaxation.cu)
// ChaCha8 against its published keystream (zero key, zero nonce, block 0); the Gumbel-softmax
// from that noise, its backward, the KL to the uniform prior and the argmax against double
// references; rows exceed the grid and the vocabulary is not a multiple of a ChaCha block.
static void test_relaxation(int rows, int vocab, uint64_t seed) {
    {
        const unsigned key[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        unsigned out[16];
        chacha8_block(key, 0, 0, out);
        // The first 16 bytes of the ChaCha8 keystream for an all-zero key and nonce.
        const unsigned char want[16] = {0x3e, 0x00, 0xef, 0x2f, 0x89, 0x5f, 0x40, 0xd6,
                                        0x7f, 0x5b, 0xb8, 0xe8, 0x1f, 0x09, 0xa5, 0xa1};
        unsigned char got[16];
        memcpy(got, out, 16);
        const bool ok = memcmp(got, want, 16) == 0;
        printf("%s relax_chacha8 known answer\n", ok ? "ok  " : "FAIL");
        if (!ok) failures++;
    }
    Rng rng{seed};
    const size_t n = (size_t)rows * vocab;
    const float tau = 0.7f, weight = 0.3f;
    const unsigned long long noise_seed = 0x1234567890abcdefULL, step = 77;
    auto logits = rng.vec(n, -3, 3);
    auto dy = rng.vec(n, -1, 1);
    const auto ld = load(logits), dyd = load(dy);
    std::vector<float> y(n, NAN), dl(n, NAN), dkl(n, 0.25f);
    std::vector<double> ne(rows, NAN);
    std::vector<unsigned> tok(rows, 99);
    emu::launch(grid(2), 64, [&] {
        beit_relax_gumbel_softmax(logits.data(), y.data(), rows, vocab, tau, noise_seed, step);
    });
    emu::launch(grid(2), 64, [&] { beit_relax_gumbel_softmax_backward(y.data(), dy.data(), dl.data(), rows, vocab, tau); });
    emu::launch(grid(2), 64, [&] { beit_relax_kl_to_uniform(logits.data(), dkl.data(), ne.data(), rows, vocab, weight); });
    // Ties and NaN for the argmax: row 0 has two equal maxima, row 1 a NaN before its maximum.
    auto al = logits;
    al[3] = al[vocab - 2] = 9.0f;
    al[(size_t)vocab + 1] = NAN;
    emu::launch(grid(2), 64, [&] { beit_relax_argmax_rows(al.data(), tok.data(), rows, vocab); });

    unsigned key[8];
    gumbel_key(noise_seed, step, key);
    std::vector<double> wy(n), wdl(n), wne(rows), wdkl(n);
    std::vector<double> wtok(rows), gtok(rows);
    for (int r = 0; r < rows; ++r) {
        const size_t b = (size_t)r * vocab;
        double mx = -INFINITY, s = 0, dot = 0;
        for (int j = 0; j < vocab; ++j) {
            unsigned words[16];
            chacha8_block(key, j / 16, r, words);
            // u as the CPU and the kernel form it, in f32 (24 bits + ½ rounds near 1).
            const double u = ((float)(words[j % 16] >> 8) + 0.5f) * (1.0f / 16777216.0f);
            wy[b + j] = (ld[b + j] - std::log(-std::log(u))) / tau;
            mx = std::max(mx, wy[b + j]);
        }
        for (int j = 0; j < vocab; ++j) s += (wy[b + j] = std::exp(wy[b + j] - mx));
        for (int j = 0; j < vocab; ++j) dot += (wy[b + j] /= s) * dyd[b + j];
        for (int j = 0; j < vocab; ++j) wdl[b + j] = wy[b + j] * (dyd[b + j] - dot) / tau;
        double lm = -INFINITY, ls = 0, e = 0;
        for (int j = 0; j < vocab; ++j) lm = std::max(lm, ld[b + j]);
        for (int j = 0; j < vocab; ++j) ls += std::exp(ld[b + j] - lm);
        const double lse = lm + std::log(ls);
        for (int j = 0; j < vocab; ++j) e += std::exp(ld[b + j] - lse) * (ld[b + j] - lse);
        wne[r] = e;
        for (int j = 0; j < vocab; ++j)
            wdkl[b + j] = 0.25 + weight * std::exp(ld[b + j] - lse) * (ld[b + j] - lse - e);
        int best = 0;
        for (int j = 1; j < vocab; ++j)
            if (al[b + j] > al[b + best]) best = j;
        wtok[r] = best;
        gtok[r] = tok[r];
    }
    const std::string tag = std::to_string(rows) + "x" + std::to_string(vocab);
    check("relax_gumbel_softmax " + tag, load(y), wy, 1e-5);
    check("relax_gumbel_softmax_backward " + tag, load(dl), wdl, 1e-5);
    check("relax_kl_to_uniform " + tag, ne, wne, 1e-5);
    check("relax_kl_to_uniform gradient " + tag, load(dkl), wdkl, 1e-5);
    check("relax_argmax_rows " + tag, gtok, wtok, 0);
}


// ---------------------------------------------------------------- token ops (tokens.cu)
// Token assembly and its backward and row gather/scatter, against the loops of the CPU pass
// written out in double. Every kernel runs with fewer threads than elements (grid-stride loops).
// Exact-copy kernels (gather, scatter, the masked rows) must be bit-exact; sums within the
// file's tolerances.
template <typename T> void test_tokens(int batch, int patches, int dim, bool pos, uint64_t seed) {
    Rng rng{seed};
    const int tokens = patches + 1;
    auto embedded = store<T>(rng.vec((size_t)batch * patches * dim, -1, 1));
    auto cls = store<T>(rng.vec(dim, -1, 1));
    auto mt = store<T>(rng.vec(dim, -1, 1));
    auto pe = store<T>(rng.vec((size_t)tokens * dim, -1, 1));
    std::vector<int> masked((size_t)batch * patches);
    for (auto& m : masked) m = rng.uniform(0, 1) < 0.4f;
    masked[0] = 1;
    std::vector<T> x((size_t)batch * tokens * dim);
    emu::launch(grid(3), 64, [&] {
        if constexpr (sizeof(T) == 4)
            beit_tokens_assemble_f32(x.data(), embedded.data(), cls.data(), mt.data(), pos ? pe.data() : nullptr,
                                       masked.data(), batch, patches, dim);
        else
            beit_tokens_assemble_bf16(x.data(), embedded.data(), cls.data(), mt.data(), pos ? pe.data() : nullptr,
                                        masked.data(), batch, patches, dim);
    });
    const auto ed = load(embedded), cd = load(cls), md = load(mt), pd = load(pe);
    std::vector<double> want(x.size());
    for (int b = 0; b < batch; ++b)
        for (int t = 0; t < tokens; ++t)
            for (int c = 0; c < dim; ++c) {
                double v = t == 0 ? cd[c] : masked[(size_t)b * patches + t - 1] ? md[c] : ed[((size_t)b * patches + t - 1) * dim + c];
                if (pos) v += pd[(size_t)t * dim + c];
                want[((size_t)b * tokens + t) * dim + c] = v;
            }
    const std::string tag = std::string(tname<T>()) + " " + std::to_string(batch) + "x" + std::to_string(tokens) +
                            "x" + std::to_string(dim) + (pos ? " pos" : "");
    check("tokens_assemble " + tag, load(x), want, sizeof(T) == 4 ? 1e-6 : 1e-2);

    // Backward of the assembly: dembedded rows, then dcls / dpos / dmask.
    auto dx = store<T>(rng.vec(x.size(), -1, 1));
    const auto dxd = load(dx);
    std::vector<T> demb(embedded.size(), beit_from_float<T>(7.0f));
    emu::launch(grid(2), 64, [&] {
        if constexpr (sizeof(T) == 4)
            beit_tokens_embed_backward_rows_f32(demb.data(), dx.data(), masked.data(), 1, batch, patches, dim);
        else
            beit_tokens_embed_backward_rows_bf16(demb.data(), dx.data(), masked.data(), 1, batch, patches, dim);
    });
    std::vector<double> wemb(demb.size());
    for (int b = 0; b < batch; ++b)
        for (int p = 0; p < patches; ++p)
            for (int c = 0; c < dim; ++c)
                wemb[((size_t)b * patches + p) * dim + c] =
                    masked[(size_t)b * patches + p] ? 0.0 : dxd[((size_t)b * tokens + 1 + p) * dim + c];
    check("tokens_embed_backward_rows " + tag, load(demb), wemb, 0.0);
    std::vector<float> dcls(dim, 0.5f), dpos((size_t)tokens * dim, -0.25f), dmask(dim, 1.0f);
    emu::launch(grid(2), 32, [&] {
        if constexpr (sizeof(T) == 4)
            beit_tokens_embed_param_grads_f32(dcls.data(), pos ? dpos.data() : nullptr, dmask.data(), dx.data(),
                                                masked.data(), batch, patches, dim);
        else
            beit_tokens_embed_param_grads_bf16(dcls.data(), pos ? dpos.data() : nullptr, dmask.data(), dx.data(),
                                                 masked.data(), batch, patches, dim);
    });
    std::vector<double> wcls(dim, 0.5), wpos((size_t)tokens * dim, -0.25), wmask(dim, 1.0);
    for (int b = 0; b < batch; ++b)
        for (int t = 0; t < tokens; ++t)
            for (int c = 0; c < dim; ++c) {
                const double g = dxd[((size_t)b * tokens + t) * dim + c];
                wpos[(size_t)t * dim + c] += g;
                if (t == 0) wcls[c] += g;
                else if (masked[(size_t)b * patches + t - 1]) wmask[c] += g;
            }
    check("tokens_embed_param_grads cls " + tag, load(dcls), wcls, 1e-5);
    check("tokens_embed_param_grads mask " + tag, load(dmask), wmask, 1e-5);
    if (pos) check("tokens_embed_param_grads pos " + tag, load(dpos), wpos, 1e-5);

    // Gather the masked rows of x, scatter them back into a zeroed buffer.
    std::vector<int> index;
    for (int b = 0; b < batch; ++b)
        for (int p = 0; p < patches; ++p)
            if (masked[(size_t)b * patches + p]) index.push_back(b * tokens + 1 + p);
    const int m = (int)index.size();
    std::vector<T> gathered((size_t)m * dim), scattered(x.size(), beit_from_float<T>(0.0f));
    emu::launch(grid(2), 64, [&] {
        if constexpr (sizeof(T) == 4) beit_tokens_gather_rows_f32(gathered.data(), x.data(), index.data(), m, dim);
        else beit_tokens_gather_rows_bf16(gathered.data(), x.data(), index.data(), m, dim);
    });
    emu::launch(grid(2), 64, [&] {
        if constexpr (sizeof(T) == 4) beit_tokens_scatter_rows_f32(scattered.data(), gathered.data(), index.data(), m, dim);
        else beit_tokens_scatter_rows_bf16(scattered.data(), gathered.data(), index.data(), m, dim);
    });
    const auto xd = load(x);
    std::vector<double> wg((size_t)m * dim), ws(x.size(), 0.0);
    for (int r = 0; r < m; ++r)
        for (int c = 0; c < dim; ++c) {
            wg[(size_t)r * dim + c] = xd[(size_t)index[r] * dim + c];
            ws[(size_t)index[r] * dim + c] = xd[(size_t)index[r] * dim + c];
        }
    check("tokens_gather_rows " + tag, load(gathered), wg, 0.0);
    check("tokens_scatter_rows " + tag, load(scattered), ws, 0.0);

    // The mean of each image's patch tokens and its backward (the CPU's f32 loop order).
    std::vector<T> mean((size_t)batch * dim), dh(x.size(), beit_from_float<T>(7.0f));
    emu::launch(grid(2), 32, [&] {
        if constexpr (sizeof(T) == 4) beit_tokens_mean_patches_f32(mean.data(), x.data(), batch, tokens, dim);
        else beit_tokens_mean_patches_bf16(mean.data(), x.data(), batch, tokens, dim);
    });
    auto dmean = store<T>(rng.vec(mean.size(), -1, 1));
    emu::launch(grid(2), 64, [&] {
        if constexpr (sizeof(T) == 4) beit_tokens_mean_patches_backward_f32(dh.data(), dmean.data(), batch, tokens, dim);
        else beit_tokens_mean_patches_backward_bf16(dh.data(), dmean.data(), batch, tokens, dim);
    });
    const auto dmd = load(dmean);
    std::vector<double> wmean(mean.size(), 0.0), wdh(x.size());
    for (int b = 0; b < batch; ++b)
        for (int t = 0; t < tokens; ++t)
            for (int c = 0; c < dim; ++c) {
                if (t > 0) wmean[(size_t)b * dim + c] += xd[((size_t)b * tokens + t) * dim + c] / (tokens - 1);
                wdh[((size_t)b * tokens + t) * dim + c] = t == 0 ? 0.0 : dmd[(size_t)b * dim + c] / (tokens - 1);
            }
    check("tokens_mean_patches " + tag, load(mean), wmean, sizeof(T) == 4 ? 1e-6 : 1e-2);
    check("tokens_mean_patches_backward " + tag, load(dh), wdh, sizeof(T) == 4 ? 1e-7 : 1e-2);
}

// ---------------------------------------------------------------- mean squared error (mse.cu)
// The fused MSE of a block of rows (part of total_rows) against mean_squared_error.rs written out
// in double; the loss sum through cross_entropy.cu's loss sum, added to what it holds.
template <typename T> void test_mse(int rows, int cols, int total_rows, uint64_t seed) {
    Rng rng{seed};
    auto pred = store<T>(rng.vec((size_t)rows * cols, -1, 1));
    auto target = store<T>(rng.vec((size_t)rows * cols, -1, 1));
    const auto pd = load(pred), td = load(target);
    std::vector<double> want_grad(pred.size()), want_loss(rows);
    double want_sum = 0.25;
    for (int r = 0; r < rows; ++r) {
        double s = 0;
        for (int c = 0; c < cols; ++c) {
            const double e = pd[(size_t)r * cols + c] - td[(size_t)r * cols + c];
            s += e * e;
            want_grad[(size_t)r * cols + c] = 2 * e / ((double)cols * total_rows);
        }
        want_loss[r] = s / cols;
        want_sum += want_loss[r];
    }
    std::vector<float> losses(rows, NAN);
    std::vector<double> sum(1, 0.25);
    emu::launch(grid(rows), MSE_THREADS, [&] {
        if constexpr (sizeof(T) == 4)
            beit_mse_forward_backward_f32(pred.data(), losses.data(), target.data(), rows, cols, total_rows);
        else
            beit_mse_forward_backward_bf16(pred.data(), losses.data(), target.data(), rows, cols, total_rows);
    });
    emu::launch(grid(1), CE_SUM_THREADS, [&] { beit_cross_entropy_loss_sum(sum.data(), losses.data(), rows); });
    const std::string tag = std::string("mse ") + tname<T>() + " " + std::to_string(rows) + "x" + std::to_string(cols);
    check(tag + " grad", load(pred), want_grad, sizeof(T) == 4 ? 1e-7 : 1e-2);
    check(tag + " losses", load(losses), want_loss, 1e-5);
    check(tag + " loss sum", sum, {want_sum}, 1e-5);
}

// ---------------------------------------------------------------- residual branch (residual.cu)
// out = x + (λ·k)·(y + bias) and its backward, with layer scale and drop path factors (one
// image dropped) or without either, out of place and in place; against double loops.
template <typename T> void test_residual(int batch, int tokens, int dim, bool full, uint64_t seed) {
    Rng rng{seed};
    const int rows = batch * tokens;
    const size_t n = (size_t)rows * dim;
    auto x = store<T>(rng.vec(n, -1, 1));
    auto y = store<T>(rng.vec(n, -1, 1));
    auto bias = store<T>(rng.vec(dim, -1, 1));
    auto lambda = store<T>(rng.vec(dim, 0.1f, 1));
    auto dacc = store<T>(rng.vec(n, -1, 1));
    std::vector<float> factors(batch);
    for (int b = 0; b < batch; ++b) factors[b] = b == 1 ? 0.0f : 1.25f;
    const T* scale = full ? lambda.data() : nullptr;
    const float* fac = full ? factors.data() : nullptr;
    const std::string tag = std::string(tname<T>()) + " " + std::to_string(rows) + "x" + std::to_string(dim) +
                            (full ? " scale+drop" : " plain");

    std::vector<T> out(n), inplace = x;
    emu::launch(grid(3), 64, [&] {
        if constexpr (sizeof(T) == 4) {
            beit_residual_forward_f32(out.data(), x.data(), y.data(), bias.data(), scale, fac, tokens, rows, dim);
            beit_residual_forward_f32(inplace.data(), inplace.data(), y.data(), bias.data(), scale, fac, tokens, rows, dim);
        } else {
            beit_residual_forward_bf16(out.data(), x.data(), y.data(), bias.data(), scale, fac, tokens, rows, dim);
            beit_residual_forward_bf16(inplace.data(), inplace.data(), y.data(), bias.data(), scale, fac, tokens, rows,
                                       dim);
        }
    });
    const auto xd = load(x), yd = load(y), bd = load(bias), ld = load(lambda), dd = load(dacc);
    auto k_of = [&](int r) { return full ? (double)factors[r / tokens] : 1.0; };
    auto s_of = [&](int c) { return full ? ld[c] : 1.0; };
    std::vector<double> want(n);
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < dim; ++c) {
            const size_t i = (size_t)r * dim + c;
            want[i] = xd[i] + s_of(c) * k_of(r) * (yd[i] + bd[c]);
        }
    check("residual_forward " + tag, load(out), want, tol<T>());
    check("residual_forward in place " + tag, load(inplace), load(out), 0.0);

    std::vector<T> dy(n);
    std::vector<float> prod(n);
    emu::launch(grid(3), 64, [&] {
        float* p = full ? prod.data() : nullptr;
        if constexpr (sizeof(T) == 4)
            beit_residual_backward_f32(dy.data(), p, dacc.data(), y.data(), bias.data(), scale, fac, tokens, rows, dim);
        else
            beit_residual_backward_bf16(dy.data(), p, dacc.data(), y.data(), bias.data(), scale, fac, tokens, rows, dim);
    });
    std::vector<double> wdy(n), wprod(n);
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < dim; ++c) {
            const size_t i = (size_t)r * dim + c;
            wdy[i] = k_of(r) * s_of(c) * dd[i];
            wprod[i] = k_of(r) * dd[i] * (yd[i] + bd[c]);
        }
    check("residual_backward dy " + tag, load(dy), wdy, tol<T>());
    if (full) check("residual_backward prod " + tag, load(prod), wprod, 1e-5);
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    test_layernorm<float>(150, 50, 1);
    test_layernorm<bf16>(150, 50, 2);
    test_layernorm<float>(5, 768, 3);
    test_residual_layernorm<float>(37, 50, true, 4);
    test_residual_layernorm<float>(9, 33, false, 5);
    test_residual_layernorm<bf16>(37, 50, true, 6);
    test_cross_entropy<float>(6, 8192, 0.0f, 7);
    test_cross_entropy<bf16>(6, 8192, 0.0f, 8);
    test_cross_entropy<float>(5, 1001, 0.1f, 9);
    test_attention<float, 32>({2, 37, 2, 32}, true, 1, 10);
    test_attention<float, 32>({3, 37, 1, 32}, true, 2, 11);
    test_attention<float, 64>({1, 70, 1, 64}, false, 1, 12);
    test_attention<bf16, 64>({2, 33, 1, 64}, true, 2, 13);
    if (!quick) test_attention<float, 64>({1, 197, 1, 64}, true, 1, 14);
    test_relpos(3, 4, 2);
    test_im2col<float>(2, 3, 7, 9, 3, 2, 1, 15);
    test_im2col<float>(1, 2, 32, 32, 16, 16, 0, 16);
    test_im2col<bf16>(2, 2, 6, 5, 4, 2, 1, 17);
    test_im2col<float>(1, 2, 5, 5, 1, 1, 0, 18);
    test_image(2, 3, 7, 9, 16, 5, 24);    // odd sizes: pooling drops a row and a column; up and down
    test_image(1, 2, 12, 10, 3, 25, 25);  // bilinear down in one axis, up in the other
    test_relaxation(5, 37, 26);
    test_relaxation(3, 300, 27);
    test_reductions<float>(99, 70, 19);
    test_reductions<bf16>(48, 33, 20);
    test_tokens<float>(3, 6, 40, true, 21);
    test_tokens<float>(2, 4, 33, false, 22);
    test_tokens<bf16>(3, 6, 40, true, 23);
    test_mse<float>(5, 300, 9, 24);
    test_mse<bf16>(3, 48, 3, 25);
    test_residual<float>(3, 7, 40, true, 24);
    test_residual<float>(2, 5, 33, false, 25);
    test_residual<bf16>(3, 7, 40, true, 26);
    printf(failures ? "%d FAILED\n" : "all passed\n", failures);
    return failures ? 1 : 0;
}

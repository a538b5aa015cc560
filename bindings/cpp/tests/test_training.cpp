// Tests of beit.hpp's training interfaces against libbeit; standard library only.
//
//   test_training <repository root>
//
// The split step (Trainer::forward_backward / gradients / apply_gradients / discard_gradients)
// equals Trainer::step bit for bit; the Gradients view is the trainer's own buffer (doubling it
// doubles the reported norm; ParameterInfo::offset places each parameter in it); a pending
// step refuses what would lose it. Parameters by Hugging Face name equal the tensors of the
// model's model.safetensors, read with the tests' own JSON parser (support.hpp); set values read
// back; Trainer::model() holds the trainer's weights; bf16 on a CPU context is refused.
//
// Prints one line per test ("PASS name" / "FAIL name: why") and exits non-zero on any failure.
#include "support.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace {

using support::expect_throw;
using support::Failure;
using support::read_safetensors;
using support::run;

std::string root;

// ---- helpers

const char* const kTinyConfig = R"({"hidden_size": 32, "num_hidden_layers": 2,
 "num_attention_heads": 4, "intermediate_size": 64, "image_size": 16, "patch_size": 4,
 "num_channels": 1, "vocab_size": 32, "use_mask_token": true,
 "use_shared_relative_position_bias": true, "layer_scale_init_value": 0.1})";

// A fixed batch of 2 images 1x16x16 (16 patches), every other patch masked.
struct Batch {
    std::vector<float> pixels = std::vector<float>(2 * 16 * 16);
    std::vector<std::uint8_t> mask = std::vector<std::uint8_t>(2 * 16);
    std::vector<std::int64_t> labels = std::vector<std::int64_t>(2 * 16);

    Batch() {
        for (std::size_t i = 0; i < pixels.size(); i++) pixels[i] = float(std::sin(double(i) * 0.37));
        for (std::size_t i = 0; i < mask.size(); i++) {
            mask[i] = std::uint8_t(i % 2);
            labels[i] = std::int64_t(i * 5 % 32);
        }
    }
    beit::MimBatch view() const {
        beit::MimBatch b;
        b.pixels = pixels;
        b.batch = 2;
        b.channels = 1;
        b.height = 16;
        b.width = 16;
        b.bool_masked_pos = mask;
        b.labels = labels;
        return b;
    }
};

beit::Trainer tiny_trainer(const beit::Context& ctx, beit::TrainerOptions o) {
    o.learning_rate = 1e-3;
    return beit::Trainer::create_from_config(ctx, kTinyConfig, 5, o);
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Every parameter of `t` by name.
std::map<std::string, beit::Tensor> all_parameters(const beit::Trainer& t) {
    std::map<std::string, beit::Tensor> out;
    for (const beit::ParameterInfo& p : t.parameters()) out[p.name] = t.parameter(p.name);
    return out;
}

// The names whose values differ in bits between a and b.
std::vector<std::string> differing(const std::map<std::string, beit::Tensor>& a,
                                   const std::map<std::string, beit::Tensor>& b) {
    std::vector<std::string> names;
    for (const auto& kv : a) {
        auto it = b.find(kv.first);
        if (it == b.end() || it->second.shape != kv.second.shape || !same_bits(it->second.data, kv.second.data)) {
            names.push_back(kv.first);
        }
    }
    if (a.size() != b.size()) names.push_back("(a different number of parameters)");
    return names;
}

// ---- tests

void test_split_step_is_step() {
    beit::Context ctx = beit::Context::cpu(2);
    beit::TrainerOptions o = beit::Trainer::default_options();
    o.drop_path_rate = 0.3;  // the split step must draw the step's stochastic depth
    o.seed = 9;
    beit::Trainer whole = tiny_trainer(ctx, o), split = tiny_trainer(ctx, o);
    const Batch batch;
    for (int i = 0; i < 3; i++) {
        const beit::StepStats want = whole.step(batch.view());
        const beit::PassStats pass = split.forward_backward(batch.view());
        CHECK(pass.loss == want.loss && pass.images == 2 && pass.masked == 16);
        const beit::StepStats got = split.apply_gradients();
        CHECK(got.step == want.step && got.loss == want.loss && got.lr == want.lr);
        CHECK(got.grad_norm == want.grad_norm && got.masked == want.masked);
    }
    CHECK(differing(all_parameters(whole), all_parameters(split)).empty());
    CHECK(whole.step(batch.view()).grad_norm == split.step(batch.view()).grad_norm);
}

void test_gradients_are_the_buffer_apply_reads() {
    beit::Context ctx = beit::Context::cpu(2);
    beit::TrainerOptions o = beit::Trainer::default_options();
    o.clip_grad_norm = 0;
    o.weight_decay = 0;
    beit::Trainer t = tiny_trainer(ctx, o), reference = tiny_trainer(ctx, o);
    const Batch batch;
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { t.gradients(); },
                                             "no step pending", "no step is pending");
    t.forward_backward(batch.view());
    beit::Gradients g = t.gradients();
    CHECK(g.on_host() && g.location() == BEIT_MEMORY_HOST && g.device_pointer() == 0 && g.stream() == nullptr);
    CHECK(t.gradients().data() == g.data());  // the trainer's buffer, not a copy
    std::size_t total = 0;
    for (const beit::ParameterInfo& p : t.parameters()) total += p.numel;
    CHECK(g.size() >= total && g.host().size() == g.size());
    double norm = 0;
    for (float& v : g) {
        norm += double(v) * double(v);
        v *= 2;
    }
    norm = std::sqrt(norm);
    const beit::StepStats doubled = t.apply_gradients();
    const beit::StepStats want = reference.step(batch.view());
    CHECK(std::fabs(want.grad_norm - norm) <= 1e-6 * norm);
    CHECK(std::fabs(doubled.grad_norm - 2 * want.grad_norm) <= 1e-6 * want.grad_norm);
}

void test_offsets_place_parameters_in_the_gradients() {
    // Without weight decay a zero gradient moves nothing (AdamW), so keeping one parameter's
    // part of the buffer changes that parameter alone.
    beit::Context ctx = beit::Context::cpu(2);
    beit::TrainerOptions o = beit::Trainer::default_options();
    o.weight_decay = 0;
    beit::Trainer t = tiny_trainer(ctx, o);
    const auto before = all_parameters(t);
    beit::ParameterInfo kept;
    for (const beit::ParameterInfo& p : t.parameters()) {
        if (p.name == "beit.encoder.layer.0.attention.attention.query.weight") kept = p;
    }
    CHECK(kept.shape == (std::vector<std::size_t>{32, 32}) && kept.numel == 1024);
    t.forward_backward(Batch().view());
    beit::Gradients g = t.gradients();
    const beit::span<float> part = kept.of(g.host());
    CHECK(part.data() == g.data() + kept.offset && part.size() == kept.numel);
    const std::vector<float> own(part.begin(), part.end());
    for (float& v : g) v = 0;
    std::copy(own.begin(), own.end(), part.begin());
    t.apply_gradients();
    CHECK(differing(before, all_parameters(t)) == std::vector<std::string>{kept.name});
    expect_throw<beit::BufferSizeError>(BEIT_ERR_BUFFER_SIZE, [&] { kept.of(g.host().subspan(0, 10)); },
                                        "of() a short buffer", kept.name.c_str());
}

void test_pending_step() {
    beit::Context ctx = beit::Context::cpu(2);
    beit::TrainerOptions o = beit::Trainer::default_options();
    o.drop_path_rate = 0.3;
    beit::Trainer t = tiny_trainer(ctx, o), reference = tiny_trainer(ctx, o);
    const Batch batch;
    const auto before = all_parameters(t);
    t.forward_backward(batch.view());
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { t.step(batch.view()); },
                                             "step while pending", "pending");
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT,
                                             [&] { t.forward_backward(batch.view()); },
                                             "forward_backward while pending", "pending");
    const std::vector<float> zeros(32);
    expect_throw<beit::InvalidArgumentError>(
        BEIT_ERR_INVALID_ARGUMENT, [&] { t.set_parameter("beit.embeddings.cls_token", zeros); },
        "set_parameter while pending", "pending");
    t.discard_gradients();
    t.discard_gradients();  // nothing pending: nothing to do
    CHECK(t.step_count() == 0 && differing(before, all_parameters(t)).empty());
    for (int i = 0; i < 2; i++) CHECK(t.step(batch.view()).loss == reference.step(batch.view()).loss);

    // A non-finite gradient drops the step: the trainer is as before forward_backward.
    const auto kept = all_parameters(t);
    t.forward_backward(batch.view());
    t.gradients()[5] = std::nanf("");
    expect_throw<beit::NumericalError>(BEIT_ERR_NUMERICAL, [&] { t.apply_gradients(); }, "NaN gradient");
    CHECK(t.step_count() == 2 && differing(kept, all_parameters(t)).empty());
}

void test_parameters_are_the_safetensors() {
    beit::Context ctx = beit::Context::cpu(2);
    const std::string dir = root + "/tests/reference/mim_shared";
    const auto stored = read_safetensors(dir + "/model.safetensors");
    beit::Model m = beit::Model::load(ctx, dir);
    const std::vector<beit::ParameterInfo> params = m.parameters();
    CHECK(params.size() == stored.size());
    std::size_t total = 0;
    for (const beit::ParameterInfo& p : params) {
        auto it = stored.find(p.name);
        if (it == stored.end()) throw Failure{p.name + " is not in model.safetensors"};
        CHECK(p.shape == it->second.shape);
        const beit::Tensor v = m.parameter(p.name);
        CHECK(v.shape == p.shape && same_bits(v.data, it->second.values));
        total += p.numel;
    }
    CHECK(total == m.info().num_parameters);
    std::vector<float> wrong(3);
    expect_throw<beit::BufferSizeError>(BEIT_ERR_BUFFER_SIZE, [&] { m.get_parameter(params[0].name, wrong); },
                                        "short buffer");
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { m.parameter("no.such"); },
                                             "unknown name", "no.such");
}

void test_set_parameter_and_copies() {
    beit::Context ctx = beit::Context::cpu(2);
    beit::Model a = beit::Model::create(ctx, kTinyConfig, BEIT_ARCH_MASKED_IMAGE_MODELING, 1);
    beit::Model b = beit::Model::create(ctx, kTinyConfig, BEIT_ARCH_MASKED_IMAGE_MODELING, 2);
    const std::string name = "beit.encoder.layer.1.output.dense.weight";
    const beit::Tensor old = a.parameter(name);
    CHECK(old.shape == (std::vector<std::size_t>{32, 64}));
    std::vector<float> values(old.data.size());
    for (std::size_t i = 0; i < values.size(); i++) values[i] = float(std::cos(double(i)));
    a.set_parameter(name, values);
    CHECK(same_bits(a.parameter(name).data, values));
    std::vector<float> bad = values;
    bad[1] = INFINITY;
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { a.set_parameter(name, bad); },
                                             "infinite value");
    expect_throw<beit::InvalidArgumentError>(
        BEIT_ERR_INVALID_ARGUMENT, [&] { a.set_parameter(name, beit::span<const float>(values.data(), 5)); },
        "short values");
    CHECK(same_bits(a.parameter(name).data, values));
    b.copy_parameters_from(a);
    for (const beit::ParameterInfo& p : a.parameters()) CHECK(same_bits(a.parameter(p.name).data, b.parameter(p.name).data));
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { a.copy_parameters_from(a); },
                                             "itself");
}

void test_trainer_model() {
    beit::Context ctx = beit::Context::cpu(2);
    beit::Trainer t = tiny_trainer(ctx, beit::Trainer::default_options());
    const Batch batch;
    t.step(batch.view());
    char dir_template[] = "/tmp/beit-cpp-test-training.XXXXXX";
    CHECK(mkdtemp(dir_template) != nullptr);
    const std::string dir = std::string(dir_template) + "/model";
    t.save_model(dir);
    const auto stored = read_safetensors(dir + "/model.safetensors");
    std::remove((dir + "/model.safetensors").c_str());
    std::remove((dir + "/config.json").c_str());
    std::remove(dir.c_str());
    std::remove(dir_template);
    beit::Model m = t.model();
    const std::vector<beit::ParameterInfo> params = t.parameters();
    const std::vector<beit::ParameterInfo> mparams = m.parameters();
    CHECK(params.size() == stored.size() && mparams.size() == params.size());
    for (std::size_t i = 0; i < params.size(); i++) {
        const beit::ParameterInfo& p = params[i];
        CHECK(mparams[i].name == p.name && mparams[i].shape == p.shape && mparams[i].offset == p.offset);
        const auto it = stored.find(p.name);
        CHECK(it != stored.end() && it->second.shape == p.shape);
        CHECK(same_bits(m.parameter(p.name).data, it->second.values));
        CHECK(same_bits(t.parameter(p.name).data, it->second.values));
    }
    // A copy: a later step leaves it; copying it back into the trainer restores its weights.
    t.step(batch.view());
    const std::string name = params[3].name;
    CHECK(same_bits(m.parameter(name).data, stored.at(name).values));
    CHECK(!same_bits(t.parameter(name).data, stored.at(name).values));
    t.copy_parameters_from(m);
    for (const beit::ParameterInfo& p : params) CHECK(same_bits(t.parameter(p.name).data, stored.at(p.name).values));
    CHECK(t.step_count() == 2);
    std::vector<float> v(t.parameter(name).data.size(), 0.25f);
    t.set_parameter(name, v);
    CHECK(same_bits(t.parameter(name).data, v));
}

void test_precision() {
    CHECK(std::string(beit::precision_name(BEIT_PRECISION_BF16)) == "bf16");
    CHECK(std::string(beit::precision_name(BEIT_PRECISION_DEFAULT)) == "default");
    CHECK(beit::Trainer::default_options().precision == BEIT_PRECISION_DEFAULT);
    beit::Context ctx = beit::Context::cpu(2);
    beit::TrainerOptions o = beit::Trainer::default_options();
    o.precision = BEIT_PRECISION_BF16;
    expect_throw<beit::UnsupportedError>(BEIT_ERR_UNSUPPORTED, [&] { tiny_trainer(ctx, o); }, "bf16 on the CPU",
                                         "precision");
    o.precision = BEIT_PRECISION_FP32;  // what the CPU computes in: the default trainer's steps
    beit::Trainer fp32 = tiny_trainer(ctx, o);
    beit::Trainer def = tiny_trainer(ctx, beit::Trainer::default_options());
    CHECK(fp32.step(Batch().view()).loss == def.step(Batch().view()).loss);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s <repository root>\n", argv[0]);
        return 2;
    }
    root = argv[1];
    beit::check_abi();
    run("split_step_is_step", test_split_step_is_step);
    run("gradients_are_the_buffer_apply_reads", test_gradients_are_the_buffer_apply_reads);
    run("offsets_place_parameters_in_the_gradients", test_offsets_place_parameters_in_the_gradients);
    run("pending_step", test_pending_step);
    run("parameters_are_the_safetensors", test_parameters_are_the_safetensors);
    run("set_parameter_and_copies", test_set_parameter_and_copies);
    run("trainer_model", test_trainer_model);
    run("precision", test_precision);
    return support::summary();
}

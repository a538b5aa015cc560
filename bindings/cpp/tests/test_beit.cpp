// Tests of beit.hpp (the C++17 wrapper) against libbeit; standard library only.
//
//   test_beit <repository root>
//
// Success paths: the reference model tests/reference/mim_shared (inference equals transformers'
// stored outputs within the Rust parity test's tolerance, |a - b| <= 1e-4 * max(1, |b|)); the
// reference tokenizer tests/reference_dvae/dalle_small (PyTorch's tokens exactly, after
// unmapping `mapped_pixels` with (x - 0.1) / 0.8); a .beitds dataset written here from
// docs/dataset-format.md (open, info, every sample read back); one trainer step; tokenizer
// training (a first step's hand-derived stats, dataset runs whole and split by the progress
// function giving the same files, its exception rethrown, the tokenizer copy tokenizing as the
// saved directory).
// Failure paths: a missing model directory or model file throws beit::Error with the right
// status and message; wrong buffer sizes throw (and write nothing); a moved-from handle throws
// beit::NullPointerError instead of crashing. Run under valgrind by bindings/cpp/test.sh.
//
// Prints one line per test ("PASS name" / "FAIL name: why") and exits non-zero on any failure.
#include "support.hpp"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

using support::expect_throw;
using support::Failure;
using support::read_file;
using support::run;

std::string root;

void write_file(const std::string& path, const std::vector<unsigned char>& bytes) {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
    if (!out) throw Failure{"cannot write " + path};
}

// A minimal safetensors reader: the raw bytes of tensor `name` (little-endian host).
struct Safetensors {
    std::vector<unsigned char> file;
    std::string header;

    explicit Safetensors(const std::string& path) : file(read_file(path)) {
        CHECK(file.size() >= 8);
        std::uint64_t n = 0;
        for (int k = 0; k < 8; k++) n |= std::uint64_t(file[std::size_t(k)]) << (8 * k);
        CHECK(n <= file.size() - 8);
        header.assign(reinterpret_cast<const char*>(file.data() + 8), std::size_t(n));
    }
    template <class T>
    std::vector<T> get(const std::string& name) const {
        const std::size_t at = header.find("\"" + name + "\":");
        if (at == std::string::npos) throw Failure{"no tensor " + name};
        const std::size_t off = header.find("\"data_offsets\":[", at);
        CHECK(off != std::string::npos);
        const char* p = header.c_str() + off + std::strlen("\"data_offsets\":[");
        char* end = nullptr;
        const std::uint64_t begin = std::strtoull(p, &end, 10);
        const std::uint64_t stop = std::strtoull(end + 1, nullptr, 10);
        CHECK(stop >= begin && (stop - begin) % sizeof(T) == 0);
        CHECK(8 + header.size() + stop <= file.size());
        std::vector<T> out(std::size_t((stop - begin) / sizeof(T)));
        std::memcpy(out.data(), file.data() + 8 + header.size() + begin, std::size_t(stop - begin));
        return out;
    }
    bool has(const std::string& name) const {
        return header.find("\"" + name + "\":") != std::string::npos;
    }
    // The shape of tensor `name`, as the file's header states it.
    std::vector<std::size_t> shape(const std::string& name) const {
        const std::size_t at = header.find("\"" + name + "\":");
        if (at == std::string::npos) throw Failure{"no tensor " + name};
        const std::size_t open = header.find("\"shape\":[", at);
        CHECK(open != std::string::npos);
        std::vector<std::size_t> dims;
        const char* p = header.c_str() + open + std::strlen("\"shape\":[");
        while (*p != ']') {
            char* end = nullptr;
            dims.push_back(std::size_t(std::strtoull(p, &end, 10)));
            CHECK(end != p);
            p = *end == ',' ? end + 1 : end;
        }
        return dims;
    }
};

// Largest |a - b| / (1e-4 * max(1, |b|)): <= 1 passes (tests/reference_parity.rs's rule).
double worst_ratio(const std::vector<float>& got, const std::vector<float>& want) {
    CHECK(got.size() == want.size());
    double worst = 0;
    for (std::size_t i = 0; i < got.size(); i++) {
        const double b = want[i];
        const double r = std::fabs(double(got[i]) - b) / (1e-4 * std::fmax(1.0, std::fabs(b)));
        if (!(r <= worst)) worst = r;  // NaN sticks
    }
    return worst;
}

std::string temp_dir() {
    char name[] = "/tmp/beit-cpp-test-XXXXXX";
    if (!mkdtemp(name)) throw Failure{"mkdtemp failed"};
    return name;
}

void remove_tree(const std::string& dir) {
    const std::string cmd = "rm -rf '" + dir + "'";
    if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "warning: cannot remove %s\n", dir.c_str());
}

const char* const kModel = "/tests/reference/mim_shared";

// ------------------------------------------------------------------------------------------

void test_version() {
    CHECK(beit::version() == std::to_string(BEIT_VERSION_MAJOR) + "." +
                                 std::to_string(BEIT_VERSION_MINOR) + "." +
                                 std::to_string(BEIT_VERSION_PATCH));
    CHECK(beit::abi_version() == BEIT_ABI_VERSION);
    beit::check_abi();
    CHECK(beit::status_name(BEIT_ERR_BUFFER_SIZE) == "BEIT_ERR_BUFFER_SIZE");
}

// The reference model against transformers' outputs.
void test_model_matches_transformers() {
    const std::string dir = root + kModel;
    const Safetensors inputs(dir + "/inputs.safetensors");
    const Safetensors outputs(dir + "/outputs.safetensors");
    const std::vector<float> pixels = inputs.get<float>("pixel_values");       // [2,3,32,32]
    const std::vector<std::uint8_t> mask = inputs.get<std::uint8_t>("bool_masked_pos");  // [2,16]
    const std::vector<float> want_hidden = outputs.get<float>("last_hidden_state");
    const std::vector<float> want_logits = outputs.get<float>("logits");

    const beit::Context ctx = beit::Context::cpu(2);
    const beit::Model model = beit::Model::load(ctx, dir);
    const beit::ModelInfo info = model.info();
    CHECK(info.architecture == BEIT_ARCH_MASKED_IMAGE_MODELING);
    CHECK(info.num_channels == 3 && info.image_height == 32 && info.vocab_size == 64);
    CHECK(info.has_mask_token);

    const beit::OutputSizes sizes = model.output_sizes(2, 32, 32);
    CHECK(sizes.last_hidden_state_len == want_hidden.size());
    CHECK(sizes.logits_len == want_logits.size());
    CHECK(sizes.pooler_output_len == 0);

    beit::Images in;
    in.pixels = pixels;
    in.batch = 2;
    in.channels = 3;
    in.height = 32;
    in.width = 32;
    in.bool_masked_pos = mask;
    std::vector<float> hidden(sizes.last_hidden_state_len), logits(sizes.logits_len);
    beit::Outputs out;
    out.last_hidden_state = hidden;
    out.logits = logits;
    model.infer(ctx, in, out);
    const double rh = worst_ratio(hidden, want_hidden), rl = worst_ratio(logits, want_logits);
    std::printf("     last_hidden_state worst error / tolerance = %.4f\n", rh);
    std::printf("     logits            worst error / tolerance = %.4f\n", rl);
    CHECK(rh <= 1.0);
    CHECK(rl <= 1.0);

    // The vector convenience writes the same logits (bit for bit) into a vector it resizes.
    std::vector<float> again;
    model.infer_logits(ctx, in, again);
    CHECK(again.size() == logits.size());
    CHECK(std::memcmp(again.data(), logits.data(), logits.size() * sizeof(float)) == 0);

    // The C structs route.
    beit_image_batch cin = in.to_c();
    std::vector<float> third(sizes.logits_len);
    beit_infer_outputs cout = beit_infer_outputs_default();
    cout.logits = third.data();
    cout.logits_len = third.size();
    model.infer(ctx, cin, cout);
    CHECK(std::memcmp(third.data(), logits.data(), logits.size() * sizeof(float)) == 0);
}

// The reference tokenizer against PyTorch's tokens.
void test_tokenizer_matches_pytorch() {
    const std::string dir = root + "/tests/reference_dvae/dalle_small";
    const Safetensors io(dir + "/io.safetensors");
    std::vector<float> pixels = io.get<float>("mapped_pixels");  // [4,3,32,32]
    const std::vector<std::int64_t> want = io.get<std::int64_t>("tokens");  // [4,16]
    for (float& x : pixels) x = (x - 0.1f) / 0.8f;

    const beit::Context ctx = beit::Context::cpu(2);
    const beit::Tokenizer tok = beit::Tokenizer::load(ctx, dir);
    const beit::TokenizerInfo info = tok.info();
    CHECK(info.in_channels == 3 && info.image_size == 32 && info.vocab_size == 96);
    CHECK(info.tokens_per_image == 16);

    std::vector<std::int64_t> tokens(4 * 16, -1);
    tok.tokenize(pixels, 4, beit::span<std::int64_t>(tokens));
    CHECK(tokens == want);

    std::vector<std::int64_t> resized;  // the vector overload sizes it
    tok.tokenize(pixels, 4, resized);
    CHECK(resized == want);

    // One image alone: a subspan of the batch, no copy.
    std::int64_t one[16];
    tok.tokenize(beit::span<const float>(pixels).subspan(3 * 3 * 32 * 32, 3 * 32 * 32), 1, one);
    CHECK(std::equal(one, one + 16, want.begin() + 48));

    // The Tensor overload: the same tokens, with PyTorch's shape.
    const beit::BasicTensor<std::int64_t> shaped = tok.tokenize(pixels, 4);
    CHECK(shaped.data == want);
    CHECK(shaped.shape == io.shape("tokens"));
}

// A .beitds file written from docs/dataset-format.md: 3 samples of 2x3x1 with labels and tokens.
void test_dataset_read() {
    const std::string dir = temp_dir();
    const std::string path = dir + "/small.beitds";
    enum { N = 3, H = 2, W = 3, C = 1, GH = 1, GW = 2, PIX = H * W * C, TOKS = GH * GW };
    const std::size_t pixels_at = 128, labels_at = 192, tokens_at = 256;
    std::vector<unsigned char> b(tokens_at + 2 * N * TOKS, 0);
    auto u32 = [&](std::size_t at, std::uint32_t v) {
        for (int k = 0; k < 4; k++) b[at + std::size_t(k)] = std::uint8_t(v >> (8 * k));
    };
    auto u64 = [&](std::size_t at, std::uint64_t v) {
        for (int k = 0; k < 8; k++) b[at + std::size_t(k)] = std::uint8_t(v >> (8 * k));
    };
    const unsigned char magic[8] = {'B', 'E', 'I', 'T', 'D', 'S', 0, 1};
    std::memcpy(b.data(), magic, 8);
    u32(8, 1);    // version
    u32(12, 128); // header size
    u64(16, N);
    u32(24, H);
    u32(28, W);
    u32(32, C);
    u32(36, 1);   // HWC u8
    u32(40, 1 | 4);  // labels | tokens
    u32(44, GH);
    u32(48, GW);
    u64(56, pixels_at);
    u64(64, N * PIX);
    u64(72, labels_at);
    u64(80, 4 * N);
    u64(104, tokens_at);
    u64(112, 2 * N * TOKS);
    for (std::size_t i = 0; i < N; i++) {
        for (std::size_t k = 0; k < PIX; k++) b[pixels_at + i * PIX + k] = std::uint8_t(10 * i + k);
        u32(labels_at + 4 * i, std::uint32_t(100 + i));
        for (std::size_t k = 0; k < TOKS; k++) {
            const std::uint16_t t = std::uint16_t(1000 * i + k);
            b[tokens_at + 2 * (i * TOKS + k)] = std::uint8_t(t & 0xff);
            b[tokens_at + 2 * (i * TOKS + k) + 1] = std::uint8_t(t >> 8);
        }
    }
    write_file(path, b);

    try {
        const beit::Dataset ds = beit::Dataset::open(path);
        const beit::DatasetInfo info = ds.info();
        CHECK(info.count == N && info.height == H && info.width == W && info.channels == C);
        CHECK(info.has_labels && !info.has_masks && info.has_tokens);
        CHECK(info.pixels_len == PIX && info.tokens_len == TOKS && info.mask_len == 0);
        CHECK(ds.size() == N);
        std::vector<std::uint8_t> pixels(info.pixels_len);
        std::vector<std::uint16_t> tokens(info.tokens_len);
        for (std::uint64_t i = 0; i < N; i++) {
            const beit::SampleMeta m = ds.read(i, pixels, {}, tokens);
            CHECK(m.label_written && m.label == 100 + i && m.tokens_written && !m.mask_written);
            for (std::size_t k = 0; k < PIX; k++) CHECK(pixels[k] == std::uint8_t(10 * i + k));
            for (std::size_t k = 0; k < TOKS; k++) CHECK(tokens[k] == 1000 * i + k);
        }
        // Without the optional buffers.
        const beit::SampleMeta m = ds.read(1, pixels);
        CHECK(m.label == 101 && !m.tokens_written);

        // Into new tensors, with the shapes the file was written with.
        const beit::Sample s = ds.read(2);
        CHECK((s.pixels.shape == std::vector<std::size_t>{H, W, C}));
        CHECK((s.tokens.shape == std::vector<std::size_t>{GH, GW}));
        CHECK(s.mask.empty() && s.mask.data.empty());
        for (std::size_t k = 0; k < PIX; k++) CHECK(s.pixels.data[k] == std::uint8_t(20 + k));
        for (std::size_t k = 0; k < TOKS; k++) CHECK(s.tokens.data[k] == 2000 + k);
        CHECK(s.meta.label_written && s.meta.label == 102 && s.meta.tokens_written);

        // Failures: wrong sizes, index out of range; nothing written.
        std::vector<std::uint8_t> short_pixels(PIX - 1, 0xee);
        expect_throw<beit::BufferSizeError>(BEIT_ERR_BUFFER_SIZE,
                                            [&] { ds.read(0, short_pixels); }, "short pixels");
        CHECK(short_pixels[0] == 0xee);
        std::vector<std::uint16_t> long_tokens(TOKS + 1, 7);
        expect_throw<beit::Error>(BEIT_ERR_BUFFER_SIZE, [&] { ds.read(0, pixels, {}, long_tokens); },
                                  "long tokens");
        CHECK(long_tokens[0] == 7);
        expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT,
                                                 [&] { ds.read(N, pixels); }, "index N");
        expect_throw<beit::IoError>(BEIT_ERR_IO, [&] { beit::Dataset::open(dir + "/none.beitds"); },
                                    "missing dataset");
    } catch (...) {
        remove_tree(dir);
        throw;
    }
    remove_tree(dir);
}

// One pretraining step through beit::Trainer on the reference model and inputs.
void test_trainer_step() {
    const std::string dir = root + kModel;
    const Safetensors inputs(dir + "/inputs.safetensors");
    const std::vector<float> pixels = inputs.get<float>("pixel_values");
    const std::vector<std::uint8_t> mask = inputs.get<std::uint8_t>("bool_masked_pos");
    std::vector<std::int64_t> labels(mask.size());
    for (std::size_t i = 0; i < labels.size(); i++) labels[i] = std::int64_t((i * 7) % 64);

    const beit::Context ctx = beit::Context::cpu(2);
    beit::TrainerOptions opts = beit::Trainer::default_options();
    opts.learning_rate = 1e-3;
    beit::Trainer trainer = beit::Trainer::load_model_dir(ctx, dir, opts);
    CHECK(trainer.step_count() == 0);
    CHECK(trainer.model_info().vocab_size == 64);
    beit::MimBatch batch;
    batch.pixels = pixels;
    batch.batch = 2;
    batch.channels = 3;
    batch.height = 32;
    batch.width = 32;
    batch.bool_masked_pos = mask;
    batch.labels = labels;
    const beit::StepStats s = trainer.step(batch);
    CHECK(s.step == 1 && std::isfinite(s.loss) && s.loss > 0 && s.masked == 11);
    CHECK(trainer.step_count() == 1);
    trainer.set_data_position(42);
    CHECK(trainer.data_position() == 42);

    // A label out of the vocabulary: refused, the trainer unchanged.
    labels[0] = 64;
    std::vector<std::uint8_t> all(mask.size(), 1);
    batch.bool_masked_pos = all;
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { trainer.step(batch); },
                                             "label 64");
    CHECK(trainer.step_count() == 1);
}

// Two threads stepping one trainer at once: each call returns or throws BusyError (nothing
// else), and the trainer ends up as one that made the successful steps in sequence.
void test_trainer_busy() {
    const char* config =
        "{\"hidden_size\": 32, \"num_hidden_layers\": 2, \"num_attention_heads\": 4, "
        "\"intermediate_size\": 64, \"image_size\": 16, \"patch_size\": 4, \"num_channels\": 1, "
        "\"vocab_size\": 32, \"use_mask_token\": true}";
    const beit::Context ctx = beit::Context::cpu(2);
    beit::MimBatch batch;
    batch.batch = 2;
    batch.channels = 1;
    batch.height = 16;
    batch.width = 16;
    std::vector<float> pixels(2 * 16 * 16);
    for (std::size_t i = 0; i < pixels.size(); i++) pixels[i] = float(std::sin(0.37 * double(i)));
    std::vector<std::uint8_t> mask(2 * 16);
    std::vector<std::int64_t> labels(2 * 16);
    for (std::size_t i = 0; i < mask.size(); i++) {
        mask[i] = std::uint8_t(i % 3 == 0);
        labels[i] = std::int64_t((i * 5) % 32);
    }
    batch.pixels = pixels;
    batch.bool_masked_pos = mask;
    batch.labels = labels;

    beit::Trainer trainer = beit::Trainer::create_from_config(ctx, config, 1);
    enum { kThreads = 4, kCalls = 3 };
    int oks = 0, busies = 0, others = 0;
    std::string other_error;
    for (int round = 0; round < 200 && busies == 0; round++) {
        int results[kThreads][kCalls];  // 0 ok, 1 busy, 2 anything else
        std::string errors[kThreads];
        std::vector<std::thread> threads;
        for (int k = 0; k < kThreads; k++) {
            threads.emplace_back([&, k] {
                for (int i = 0; i < kCalls; i++) {
                    try {
                        trainer.step(batch);
                        results[k][i] = 0;
                    } catch (const beit::BusyError& e) {
                        results[k][i] = e.status() == BEIT_ERR_BUSY ? 1 : 2;
                    } catch (const std::exception& e) {
                        results[k][i] = 2;
                        errors[k] = e.what();
                    }
                }
            });
        }
        for (std::thread& t : threads) t.join();
        for (int k = 0; k < kThreads; k++) {
            for (int i = 0; i < kCalls; i++) {
                oks += results[k][i] == 0;
                busies += results[k][i] == 1;
                others += results[k][i] == 2;
            }
            if (!errors[k].empty()) other_error = errors[k];
        }
    }
    if (others != 0) throw Failure{"a concurrent step threw something else: " + other_error};
    CHECK(busies > 0);  // else the test proved nothing
    CHECK(trainer.step_count() == std::uint64_t(oks));

    beit::Trainer twin = beit::Trainer::create_from_config(ctx, config, 1);
    for (int i = 0; i < oks; i++) twin.step(batch);
    const std::string dir = temp_dir();
    bool same = false;
    try {
        trainer.save_checkpoint(dir + "/concurrent.ckpt");
        twin.save_checkpoint(dir + "/sequential.ckpt");
        same = read_file(dir + "/concurrent.ckpt") == read_file(dir + "/sequential.ckpt");
    } catch (...) {
        remove_tree(dir);
        throw;
    }
    remove_tree(dir);
    CHECK(same);  // weights, optimizer state, step and random state all equal
}

// A context's memory budget: BEiT-base does not fit in 1 MiB (ConfigError naming the budget,
// before any allocation); a tiny model does.
void test_memory_budget() {
    const beit::Context small = beit::Context::cpu(1, std::uint64_t(1) << 20);
    expect_throw<beit::ConfigError>(
        BEIT_ERR_CONFIG, [&] { beit::Model::create(small, "{}", BEIT_ARCH_BACKBONE, 1); },
        "BEiT-base in 1 MiB", "memory budget set for this context");
    const beit::Model tiny = beit::Model::create(
        small,
        "{\"hidden_size\": 8, \"num_hidden_layers\": 1, \"num_attention_heads\": 2, "
        "\"intermediate_size\": 16, \"image_size\": 8, \"patch_size\": 4}",
        BEIT_ARCH_BACKBONE, 1);
    CHECK(tiny.info().hidden_size == 8);
    CHECK(beit::Context::default_options().memory_budget == 0);
}

// Missing directory, directory without model.safetensors, bad config: the right status.
void test_missing_model_files() {
    const beit::Context ctx = beit::Context::cpu(1);
    expect_throw<beit::IoError>(BEIT_ERR_IO,
                                [&] { beit::Model::load(ctx, root + "/tests/no-such-model"); },
                                "missing dir", "no-such-model");
    const std::string dir = temp_dir();
    try {
        write_file(dir + "/config.json", read_file(root + kModel + "/config.json"));
        expect_throw<beit::Error>(BEIT_ERR_IO, [&] { beit::Model::load(ctx, dir); },
                                  "no model.safetensors", "model.safetensors");
        // A truncated model file is a format error.
        std::vector<unsigned char> model = read_file(root + kModel + "/model.safetensors");
        model.resize(model.size() / 2);
        write_file(dir + "/model.safetensors", model);
        expect_throw<beit::FormatError>(BEIT_ERR_FORMAT, [&] { beit::Model::load(ctx, dir); },
                                        "truncated model.safetensors");
        expect_throw<beit::Error>(BEIT_ERR_IO, [&] { beit::Tokenizer::load(ctx, dir + "/x"); },
                                  "missing tokenizer");
    } catch (...) {
        remove_tree(dir);
        throw;
    }
    remove_tree(dir);
    expect_throw<beit::Error>(BEIT_ERR_FORMAT,
                              [&] { beit::Model::create(ctx, "{not json", BEIT_ARCH_BACKBONE, 1); },
                              "bad json");
}

// Wrong buffer and input sizes throw and leave the caller's buffers untouched.
void test_wrong_buffer_sizes() {
    const std::string dir = root + kModel;
    const beit::Context ctx = beit::Context::cpu(1);
    const beit::Model model = beit::Model::load(ctx, dir);
    const beit::OutputSizes sizes = model.output_sizes(1, 32, 32);
    std::vector<float> pixels(3 * 32 * 32, 0.25f);
    beit::Images in;
    in.pixels = pixels;
    in.batch = 1;
    in.channels = 3;
    in.height = 32;
    in.width = 32;

    const float sentinel = 12345.0f;
    std::vector<float> logits(sizes.logits_len - 1, sentinel);
    beit::Outputs out;
    out.logits = logits;
    expect_throw<beit::BufferSizeError>(BEIT_ERR_BUFFER_SIZE, [&] { model.infer(ctx, in, out); },
                                        "logits one short");
    CHECK(logits[0] == sentinel && logits.back() == sentinel);

    std::vector<float> hidden(sizes.last_hidden_state_len + 1, sentinel);
    std::vector<float> good_logits(sizes.logits_len, sentinel);
    out.logits = good_logits;
    out.last_hidden_state = hidden;
    expect_throw<beit::BufferSizeError>(BEIT_ERR_BUFFER_SIZE, [&] { model.infer(ctx, in, out); },
                                        "hidden one long");
    CHECK(good_logits[0] == sentinel);

    // A pooler buffer for a model without a pooler.
    std::vector<float> pooled(32);
    beit::Outputs no_pooler;
    no_pooler.pooler_output = pooled;
    expect_throw<beit::Error>(BEIT_ERR_INVALID_ARGUMENT, [&] { model.infer(ctx, in, no_pooler); },
                              "pooler of a MIM model");

    // Pixels one short of batch * C * H * W.
    in.pixels = beit::span<const float>(pixels.data(), pixels.size() - 1);
    out.last_hidden_state = {};
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT,
                                             [&] { model.infer(ctx, in, out); }, "pixels short");
    // Wrong mask length.
    in.pixels = pixels;
    std::vector<std::uint8_t> mask(15, 1);
    in.bool_masked_pos = mask;
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT,
                                             [&] { model.infer(ctx, in, out); }, "mask 15");

    // The tokenizer: tokens one short, pixels one long.
    const beit::Tokenizer tok =
        beit::Tokenizer::load(ctx, root + "/tests/reference_dvae/dalle_small");
    std::vector<float> img(3 * 32 * 32, 0.5f);
    std::vector<std::int64_t> tokens(15, -7);
    expect_throw<beit::BufferSizeError>(BEIT_ERR_BUFFER_SIZE,
                                        [&] { tok.tokenize(img, 1, beit::span<std::int64_t>(tokens)); },
                                        "tokens 15");
    CHECK(tokens[0] == -7);
    img.push_back(0.5f);
    std::vector<std::int64_t> tokens16(16);
    expect_throw<beit::Error>(BEIT_ERR_INVALID_ARGUMENT,
                              [&] { tok.tokenize(img, 1, beit::span<std::int64_t>(tokens16)); },
                              "pixels one long");
    std::vector<float> decoded(3 * 32 * 32);
    // (The C API answers BEIT_ERR_INVALID_ARGUMENT here, not BEIT_ERR_UNSUPPORTED.)
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT,
                                             [&] { tok.decode(tokens16, 1, decoded); },
                                             "decode without a decoder", "decoder");
}

// Moved-from and default-built handles throw NullPointerError; moves transfer ownership.
void test_moved_from_handles() {
    beit::Context ctx = beit::Context::cpu(1);
    beit::Model a = beit::Model::load(ctx, root + kModel);
    beit::Model b = std::move(a);
    CHECK(!a && b);
    expect_throw<beit::NullPointerError>(BEIT_ERR_NULL_POINTER, [&] { a.info(); }, "moved-from model",
                                         "beit::Model");
    CHECK(b.info().vocab_size == 64);

    // Move assignment frees the target's old model (valgrind would report a leak otherwise).
    beit::Model c = beit::Model::load(ctx, root + kModel);
    c = std::move(b);
    CHECK(c && !b);
    c = std::move(c);  // self-move keeps it
    CHECK(c.info().vocab_size == 64);

    beit::Context moved_ctx = std::move(ctx);
    expect_throw<beit::NullPointerError>(BEIT_ERR_NULL_POINTER,
                                         [&] { beit::Model::load(ctx, root + kModel); },
                                         "moved-from context", "beit::Context");
    std::vector<float> logits;
    beit::Images in;
    expect_throw<beit::NullPointerError>(BEIT_ERR_NULL_POINTER, [&] { c.infer_logits(ctx, in, logits); },
                                         "infer with moved-from context");

    beit::Tokenizer t;
    expect_throw<beit::NullPointerError>(BEIT_ERR_NULL_POINTER, [&] { t.info(); }, "empty tokenizer");
    beit::Dataset d;
    expect_throw<beit::NullPointerError>(BEIT_ERR_NULL_POINTER, [&] { d.size(); }, "empty dataset");
    beit::Trainer tr;
    expect_throw<beit::NullPointerError>(BEIT_ERR_NULL_POINTER, [&] { tr.step_count(); },
                                         "empty trainer");
    c.reset();
    c.reset();
    expect_throw<beit::NullPointerError>(BEIT_ERR_NULL_POINTER, [&] { c.info(); }, "reset model");

    // A trainer and model outlive nothing they need: freeing the context first is allowed.
    beit::Model m = beit::Model::load(moved_ctx, root + kModel);
    moved_ctx.reset();
    CHECK(m.info().vocab_size == 64);
}

// The C API's own NULL checks still surface as exceptions (a null pixels span).
void test_null_inputs() {
    const beit::Context ctx = beit::Context::cpu(1);
    const beit::Model model = beit::Model::load(ctx, root + kModel);
    beit::Images in;
    in.batch = 1;
    in.channels = 3;
    in.height = 32;
    in.width = 32;
    std::vector<float> logits(model.output_sizes(1, 32, 32).logits_len);
    beit::Outputs out;
    out.logits = logits;
    expect_throw<beit::NullPointerError>(BEIT_ERR_NULL_POINTER, [&] { model.infer(ctx, in, out); },
                                         "null pixels", "pixels");
}

// Model::infer(ctx, images) returns every output with its shape: on a masked image modeling, a
// classification, a backbone and a segmentation reference, each tensor has transformers' shape
// and numbers (and output_shapes says the same before inference); an output transformers does
// not give is an empty tensor (but the segmentation model's last_hidden_state, which the
// reference does not store).
void test_inference_shapes() {
    const char* const cases[] = {"/tests/reference/mim_shared", "/tests/reference/cls_all_pos_cls",
                                 "/tests/reference/backbone_abs_mean",
                                 "/tests/reference_segmentation/aux_concat_32"};
    const beit_architecture archs[] = {BEIT_ARCH_MASKED_IMAGE_MODELING, BEIT_ARCH_IMAGE_CLASSIFICATION,
                                       BEIT_ARCH_BACKBONE, BEIT_ARCH_SEMANTIC_SEGMENTATION};
    const beit::Context ctx = beit::Context::cpu(2);
    for (std::size_t c = 0; c < 4; c++) {
        const std::string dir = root + cases[c];
        const Safetensors inputs(dir + "/inputs.safetensors");
        const Safetensors outputs(dir + "/outputs.safetensors");
        const std::vector<float> pixels = inputs.get<float>("pixel_values");
        const std::vector<std::size_t> shape = inputs.shape("pixel_values");
        std::vector<std::uint8_t> mask;
        if (inputs.has("bool_masked_pos")) mask = inputs.get<std::uint8_t>("bool_masked_pos");
        const beit::Model model = beit::Model::load(ctx, dir);
        CHECK(model.info().architecture == archs[c]);
        beit::Images in;
        in.pixels = pixels;
        in.batch = shape[0];
        in.channels = shape[1];
        in.height = shape[2];
        in.width = shape[3];
        in.bool_masked_pos = mask;
        const beit::InferResult r = model.infer(ctx, in);
        const beit::OutputShapes shapes = model.output_shapes(in.batch, in.height, in.width);
        const std::pair<const char*, std::pair<const beit::Tensor*, const std::vector<std::size_t>*>>
            got[] = {{"last_hidden_state", {&r.last_hidden_state, &shapes.last_hidden_state}},
                     {"pooler_output", {&r.pooler_output, &shapes.pooler_output}},
                     {"logits", {&r.logits, &shapes.logits}}};
        int compared = 0;
        for (const auto& [name, tensor_and_shape] : got) {
            const beit::Tensor& t = *tensor_and_shape.first;
            if (!outputs.has(name)) {
                // The segmentation reference stores logits alone (HF's semantic segmentation
                // output has no last_hidden_state); libbeit gives its backbone's.
                const bool unstored = archs[c] == BEIT_ARCH_SEMANTIC_SEGMENTATION &&
                                      std::string(name) == "last_hidden_state";
                if (!unstored && (!t.empty() || !t.data.empty() || !tensor_and_shape.second->empty())) {
                    throw Failure{std::string(cases[c]) + ": " + name + " exists, transformers has none"};
                }
                continue;
            }
            const std::vector<std::size_t> want = outputs.shape(name);
            if (t.shape != want || *tensor_and_shape.second != want || t.size() != t.data.size()) {
                throw Failure{std::string(cases[c]) + ": " + name + " shape " +
                              beit::detail::shape_text(t.shape) + ", transformers " +
                              beit::detail::shape_text(want)};
            }
            CHECK(worst_ratio(t.data, outputs.get<float>(name)) <= 1.0);
            compared++;
        }
        CHECK(compared > 0);
    }
    // Segmentation logits are [B, labels, 4·gh, 4·gw]: aux_concat_32 runs 32x32 images in 8x8
    // patches.
    const beit::Model seg = beit::Model::load(ctx, root + cases[3]);
    const beit::ModelInfo si = seg.info();
    CHECK(si.patch_height == 8 && si.patch_width == 8);
    CHECK((seg.output_shapes(3, 32, 32).logits ==
           std::vector<std::size_t>{3, si.num_labels, 16, 16}));
}

// Decode's Tensor overload: the span overload's pixels, shaped [batch, C, S, S].
void test_decode_shape() {
    const beit::Context ctx = beit::Context::cpu(1);
    const beit::Tokenizer tok = beit::Tokenizer::load(ctx, root + "/tests/reference_dvae/grad_tiny");
    const beit::TokenizerInfo info = tok.info();
    CHECK(info.has_decoder && info.in_channels == 1 && info.image_size == 8);
    std::vector<std::int64_t> tokens(2 * info.tokens_per_image);
    for (std::size_t k = 0; k < tokens.size(); k++) tokens[k] = std::int64_t(k % info.vocab_size);
    const beit::Tensor images = tok.decode(tokens, 2);
    CHECK((images.shape == std::vector<std::size_t>{2, 1, 8, 8}));
    std::vector<float> plain(2 * 8 * 8);
    tok.decode(tokens, 2, beit::span<float>(plain));
    CHECK(std::memcmp(plain.data(), images.data.data(), plain.size() * sizeof(float)) == 0);
}

// The value of "key" in a flat JSON text (a string unquoted, anything else as written).
std::string json_value(const std::string& json, const std::string& key) {
    const std::size_t at = json.find("\"" + key + "\":");
    if (at == std::string::npos) throw Failure{"beit info has no " + key};
    std::size_t p = at + key.size() + 3;
    std::string v;
    if (json[p] == '"') {
        for (p++; p < json.size() && json[p] != '"'; p++) {
            if (json[p] == '\\') p++;
            v += json[p];
        }
        return v;
    }
    while (p < json.size() && json[p] != ',' && json[p] != '}') v += json[p++];
    return v;
}

// beit::device_info() reports what `beit info` reports (the CLI reads the same probe through
// the Rust API and prints JSON), field by field.
void test_device_info_matches_cli() {
    const beit::DeviceInfo info = beit::device_info();
    const std::string cmd = "'" + root + "/target/release/beit' info";
    FILE* pipe = popen(cmd.c_str(), "r");
    if (!pipe) throw Failure{"cannot run " + cmd};
    std::string json;
    char buf[4096];
    for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, pipe)) > 0;) json.append(buf, n);
    if (pclose(pipe) != 0) throw Failure{cmd + " failed"};

    CHECK(beit::device_name(info.kind) == json_value(json, "device"));
    CHECK((info.cuda_usable ? "true" : "false") == json_value(json, "cuda_usable"));
    CHECK(info.kind == (info.cuda_usable ? BEIT_DEVICE_CUDA : BEIT_DEVICE_CPU));
    CHECK(std::to_string(info.device_count) == json_value(json, "device_count"));
    const std::string reason = json_value(json, "reason");
    CHECK(!info.reason.empty() && reason.compare(0, info.reason.size(), info.reason) == 0);
    const std::string driver = json_value(json, "driver_cuda_version");
    if (info.driver_version > 0) {
        CHECK(driver == std::to_string(info.driver_version / 1000) + "." +
                            std::to_string(info.driver_version % 1000 / 10));
    } else {
        CHECK(driver == "null");
    }
    if (json_value(json, "gpu") == "null") {
        CHECK(info.name == "cpu" && info.total_memory == 0);
        CHECK(info.compute_capability_major == 0 && info.compute_capability_minor == 0);
    } else {
        CHECK(info.name == json_value(json, "name"));
        CHECK(std::to_string(info.total_memory) == json_value(json, "total_memory_bytes"));
        CHECK(std::to_string(info.compute_capability_major) + "." +
                  std::to_string(info.compute_capability_minor) ==
              json_value(json, "compute_capability"));
    }
    CHECK(std::string(beit::device_name(BEIT_DEVICE_AUTO)) == "auto");
    const beit::DeviceInfo again = beit::device_info();
    CHECK(again.reason == info.reason && again.name == info.name && again.kind == info.kind);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Tokenizer training (beit::DvaeTrainer)

// A pixels-only grey dataset of `n` 12x12 images at `path` (docs/dataset-format.md).
void write_grey_dataset(const std::string& path, std::size_t n) {
    const std::size_t pix = 12 * 12;
    std::vector<unsigned char> b(128 + n * pix, 0);
    auto u32 = [&](std::size_t at, std::uint32_t v) {
        for (int k = 0; k < 4; k++) b[at + std::size_t(k)] = std::uint8_t(v >> (8 * k));
    };
    auto u64 = [&](std::size_t at, std::uint64_t v) {
        for (int k = 0; k < 8; k++) b[at + std::size_t(k)] = std::uint8_t(v >> (8 * k));
    };
    const unsigned char magic[8] = {'B', 'E', 'I', 'T', 'D', 'S', 0, 1};
    std::memcpy(b.data(), magic, 8);
    u32(8, 1);
    u32(12, 128);
    u64(16, n);
    u32(24, 12);
    u32(28, 12);
    u32(32, 1);
    u32(36, 1);
    u64(56, 128);
    u64(64, n * pix);
    for (std::size_t i = 0; i < n; i++)
        for (std::size_t k = 0; k < pix; k++) b[128 + i * pix + k] = std::uint8_t(k * 29 + i * 83 + (k / 12) * i);
    write_file(path, b);
}

beit::DvaeConfig small_dvae_config() {
    beit::DvaeConfig c = beit::DvaeTrainer::default_config();
    c.image_size = 8;
    c.vocab_size = 16;
    c.n_hid = 8;
    c.group_count = 2;
    c.n_blk_per_group = 1;
    c.decoder_n_init = 8;
    return c;
}

beit::DvaeTrainOptions small_dvae_options() {
    beit::DvaeTrainOptions o = beit::DvaeTrainer::default_options();
    o.lr = 2e-3f;
    o.kl_weight = 0.01f;
    o.tau_start = 0.9f;
    o.tau_end = 0.2f;
    o.total_steps = 7;
    o.seed = 11;
    return o;
}

bool same_tokenizer_files(const std::string& a, const std::string& b) {
    return read_file(a + "/config.json") == read_file(b + "/config.json") &&
           read_file(a + "/model.safetensors") == read_file(b + "/model.safetensors");
}

// Host steps report what a first step must; dataset training calls the progress function per
// step, stops when it returns true, and gives the same files whole or split; an exception from
// it comes out of train(); the tokenizer copy tokenizes as the saved directory; errors throw.
void test_dvae_trainer() {
    const std::string dir = temp_dir();
    const std::string data = dir + "/grey.beitds";
    write_grey_dataset(data, 12);
    try {
        beit::ContextOptions co = beit_context_options_default();
        co.device = BEIT_DEVICE_CPU;
        co.num_threads = 2;
        const beit::Context ctx(co);
        beit::DvaeTrainer t = beit::DvaeTrainer::create(ctx, small_dvae_config(), small_dvae_options());
        const beit::TokenizerInfo info = t.info();
        CHECK(info.image_size == 8 && info.vocab_size == 16 && info.grid_h == 4 && info.has_decoder);
        std::vector<float> px(3 * 64);
        for (std::size_t i = 0; i < px.size(); i++) px[i] = float((i * 37) % 97) / 96.0f;
        beit::map_pixels(px);
        const beit::DvaeStepStats s = t.step(px, 3);
        // Step 0: the starting temperature, the peak rate after a 1-step warmup, KL weight 0.
        CHECK(s.step == 1 && s.tau == double(0.9f) && s.lr == double(2e-3f) && s.loss == s.recon_mse);
        CHECK(t.step_count() == 1);

        beit::DvaeDataOptions d = beit::DvaeTrainer::default_data_options();
        d.batch = 4;
        d.crop_scale_min = 0.4;
        d.seed = 3;
        beit::DvaeTrainer whole = beit::DvaeTrainer::create(ctx, small_dvae_config(), small_dvae_options());
        std::vector<std::uint64_t> steps;
        beit::DvaeTrainSummary r = whole.train(data, d, [&](const beit::DvaeStepStats& st) {
            steps.push_back(st.step);
            return false;
        });
        CHECK(r.steps == 7 && !r.stopped && steps.size() == 7 && steps.back() == 7);
        whole.save(dir + "/whole");

        beit::DvaeTrainer split = beit::DvaeTrainer::create(ctx, small_dvae_config(), small_dvae_options());
        r = split.train(data, d, [](const beit::DvaeStepStats& st) { return st.step == 3; });
        CHECK(r.steps == 3 && r.stopped && split.step_count() == 3);
        r = split.train(data, d);
        CHECK(r.steps == 4 && split.step_count() == 7);
        split.save(dir + "/split");
        CHECK(same_tokenizer_files(dir + "/whole", dir + "/split"));

        bool thrown = false;
        try {
            d.steps = 3;
            split.train(data, d, [](const beit::DvaeStepStats&) -> bool { throw std::out_of_range("stop"); });
        } catch (const std::out_of_range&) {
            thrown = true;
        }
        CHECK(thrown && split.step_count() == 8);

        const beit::Tokenizer copy = whole.tokenizer();
        const beit::Tokenizer saved = beit::Tokenizer::load(ctx, dir + "/whole");
        std::vector<float> plain(4 * 64);
        for (std::size_t i = 0; i < plain.size(); i++) plain[i] = float((i * 13) % 50) / 49.0f;
        std::vector<std::int64_t> a, b;
        copy.tokenize(plain, 4, a);
        saved.tokenize(plain, 4, b);
        CHECK(a == b && a.size() == 64);
        const beit::DvaeTrainer loaded = beit::DvaeTrainer::load(ctx, dir + "/whole", small_dvae_options());
        CHECK(loaded.step_count() == 0);
        loaded.save(dir + "/again");
        CHECK(same_tokenizer_files(dir + "/whole", dir + "/again"));

        beit::DvaeConfig bad = small_dvae_config();
        bad.n_hid = 6;
        expect_throw<beit::InvalidArgumentError>(
            BEIT_ERR_INVALID_ARGUMENT, [&] { beit::DvaeTrainer::create(ctx, bad); }, "n_hid 6", "config->n_hid");
        expect_throw<beit::InvalidArgumentError>(
            BEIT_ERR_INVALID_ARGUMENT, [&] { t.step(beit::span<const float>(px.data(), 10), 3); }, "short pixels",
            "pixels_len is 10");
        expect_throw<beit::IoError>(BEIT_ERR_IO, [&] { t.train(dir + "/missing.beitds", d); }, "missing dataset",
                                    "missing.beitds");
        d.batch = 13;
        expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { t.train(data, d); },
                                                 "batch larger than the dataset", "fewer images");
        beit::DvaeTrainer moved = std::move(t);
        expect_throw<beit::NullPointerError>(BEIT_ERR_NULL_POINTER, [&] { t.step_count(); }, "moved-from",
                                             "DvaeTrainer");
        CHECK(moved.step_count() == 1);
    } catch (...) {
        remove_tree(dir);
        throw;
    }
    remove_tree(dir);
}

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s <repository root>\n", argv[0]);
        return 2;
    }
    root = argv[1];
    run("version", test_version);
    run("model_matches_transformers", test_model_matches_transformers);
    run("tokenizer_matches_pytorch", test_tokenizer_matches_pytorch);
    run("dataset_read", test_dataset_read);
    run("trainer_step", test_trainer_step);
    run("trainer_busy", test_trainer_busy);
    run("memory_budget", test_memory_budget);
    run("missing_model_files", test_missing_model_files);
    run("wrong_buffer_sizes", test_wrong_buffer_sizes);
    run("moved_from_handles", test_moved_from_handles);
    run("null_inputs", test_null_inputs);
    run("inference_shapes", test_inference_shapes);
    run("decode_shape", test_decode_shape);
    run("device_info_matches_cli", test_device_info_matches_cli);
    run("dvae_trainer", test_dvae_trainer);
    return support::summary();
}

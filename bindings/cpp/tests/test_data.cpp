// Tests of beit.hpp's data classes (DatasetWriter, import_dataset, Loader, MaskGenerator)
// against libbeit; standard library only.
//
//   test_data <repository root>
//
// A dataset written in two chunks reads back byte for byte; a destroyed unfinished writer
// leaves nothing; an IDX file written here imports as its pixels; with cached tokens the
// loader's view 1 equals (pixel / 255 - 0.5) / 0.5 of the sample its label names, its tokens
// that sample's, with shapes on every output, the short last batch trimmed, seek exact, and
// batches accepted by Trainer::step; the mask generator is seeded and in bounds; bad input
// throws the status's exception class.
//
// Prints one line per test ("PASS name" / "FAIL name: why") and exits non-zero on any failure.
#include "support.hpp"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <dirent.h>
#include <unistd.h>

namespace {

using support::expect_throw;
using support::Failure;
using support::run;

std::string dir;

int entries(const std::string& d) {
    DIR* h = opendir(d.c_str());
    if (!h) return -1;
    int n = 0;
    while (dirent* e = readdir(h)) n += std::string(e->d_name) != "." && std::string(e->d_name) != "..";
    closedir(h);
    return n;
}

constexpr std::size_t N = 10, H = 8, W = 8, C = 3, PIX = H * W * C;

std::uint8_t pixel(std::size_t i, std::size_t k) { return std::uint8_t((i * 53 + k * 29 + 7) % 256); }
std::uint16_t token(std::size_t i, std::size_t k) { return std::uint16_t((i * 4 + k) % 32); }

// N RGB 8x8 samples, label = index, 2x2 tokens, written in two chunks.
beit::DatasetInfo write_data(const std::string& path) {
    std::vector<std::uint8_t> px(N * PIX);
    std::vector<std::uint32_t> labels(N);
    std::vector<std::uint16_t> tokens(N * 4);
    for (std::size_t i = 0; i < N; i++) {
        for (std::size_t k = 0; k < PIX; k++) px[i * PIX + k] = pixel(i, k);
        labels[i] = std::uint32_t(i);
        for (std::size_t k = 0; k < 4; k++) tokens[i * 4 + k] = token(i, k);
    }
    beit::DatasetSpec spec = beit::DatasetWriter::default_spec();
    spec.height = H;
    spec.width = W;
    spec.channels = C;
    spec.has_labels = true;
    spec.has_tokens = true;
    spec.token_grid_h = spec.token_grid_w = 2;
    beit::DatasetWriter w = beit::DatasetWriter::create(path, spec);
    for (std::size_t from : {std::size_t(0), std::size_t(4)}) {
        const std::size_t n = from == 0 ? 4 : N - 4;
        beit::Samples s;
        s.count = n;
        s.pixels = beit::span<const std::uint8_t>(px.data() + from * PIX, n * PIX);
        s.labels = beit::span<const std::uint32_t>(labels.data() + from, n);
        s.tokens = beit::span<const std::uint16_t>(tokens.data() + from * 4, n * 4);
        w.append(s);
    }
    CHECK(w.count() == N);
    return w.finish();
}

void test_writer() {
    const std::string path = dir + "/d.beitds";
    const beit::DatasetInfo info = write_data(path);
    CHECK(info.count == N && info.channels == C && info.has_labels && info.has_tokens);
    beit::Dataset ds = beit::Dataset::open(path);
    std::vector<std::uint8_t> px(PIX);
    std::vector<std::uint16_t> toks(4);
    for (std::size_t i = 0; i < N; i++) {
        const beit::SampleMeta m = ds.read(i, beit::span<std::uint8_t>(px), {}, beit::span<std::uint16_t>(toks));
        CHECK(m.label == i && toks[3] == token(i, 3));
        for (std::size_t k = 0; k < PIX; k++) CHECK(px[k] == pixel(i, k));
    }
    {
        beit::DatasetSpec spec = beit::DatasetWriter::default_spec();
        spec.height = spec.width = 2;
        spec.channels = 1;
        beit::DatasetWriter w = beit::DatasetWriter::create(dir + "/abandoned.beitds", spec);
        std::vector<std::uint8_t> four(4, 9);
        beit::Samples s;
        s.count = 1;
        s.pixels = beit::span<const std::uint8_t>(four.data(), 3);
        expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { w.append(s); }, "3 pixels for 4", "pixels_len is 3");
        s.pixels = beit::span<const std::uint8_t>(four);
        w.append(s);
        CHECK(w.count() == 1);
    }
    CHECK(entries(dir) == 1);  // only d.beitds: the abandoned writer left nothing
}

void test_import() {
    std::vector<unsigned char> idx = {0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2, 10, 20, 30, 40};
    const std::string images = dir + "/i.idx", out = dir + "/i.beitds";
    std::ofstream(images, std::ios::binary).write(reinterpret_cast<const char*>(idx.data()), std::streamsize(idx.size()));
    beit::ImportOptions o = beit::default_import_options();
    o.format = BEIT_IMPORT_IDX;
    o.images = images.c_str();
    o.out = out.c_str();
    const beit::DatasetInfo info = beit::import_dataset(o);
    CHECK(info.count == 2 && info.height == 1 && info.width == 2 && info.channels == 1);
    beit::Dataset ds = beit::Dataset::open(out);
    std::vector<std::uint8_t> px(2);
    ds.read(1, beit::span<std::uint8_t>(px));
    CHECK(px[0] == 30 && px[1] == 40);
    o.out = images.c_str();
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { beit::import_dataset(o); }, "out = images", "opts->out");
}

void test_loader() {
    const std::string path = dir + "/d.beitds";
    beit::Context ctx = beit::Context::cpu(2);
    beit::LoaderOptions o = beit::Loader::default_options();
    o.batch_size = 4;
    o.image_height = o.image_width = H;
    o.patch_height = o.patch_width = 4;
    o.token_source = BEIT_TOKENS_CACHED;
    o.drop_last = false;
    o.seed = 3;
    o.workers = 2;
    beit::Loader loader = beit::Loader::create(ctx, path, o);
    const beit::LoaderInfo info = loader.info();
    CHECK(info.batches_per_epoch == 3 && info.num_patches == 4 && info.masked_patches == 2);
    beit::LoaderBatch b;
    std::map<std::int64_t, int> seen;
    for (int p = 0; p < 3; p++) {
        loader.next(b);
        CHECK(b.position == std::uint64_t(p) && b.epoch == 0);
        CHECK(b.images == (p == 2 ? 2u : 4u));
        CHECK((b.view1_shape() == std::array<std::size_t, 4>{b.images, C, H, W}));
        CHECK(b.view1.size() == b.images * C * H * W && b.labels.size() == b.images && b.tokens.size() == b.images * 4);
        CHECK((b.mask_shape() == std::array<std::size_t, 2>{b.images, 4}));
        for (std::size_t k = 0; k < b.images; k++) {
            const std::size_t i = std::size_t(b.labels[k]);
            seen[b.labels[k]]++;
            for (std::size_t c = 0; c < C; c++)
                for (std::size_t q = 0; q < H * W; q++) {
                    const float want = (float(pixel(i, q * C + c)) * (1.0f / 255.0f) - 0.5f) / 0.5f;
                    CHECK(b.view1[(k * C + c) * H * W + q] == want);
                }
            for (std::size_t q = 0; q < 4; q++) CHECK(b.tokens[k * 4 + q] == token(i, q));
        }
    }
    CHECK(seen.size() == N);
    loader.seek(1);
    const beit::LoaderBatch again = loader.next();
    loader.seek(4);
    loader.next();
    loader.seek(1);
    const beit::LoaderBatch third = loader.next();
    CHECK(again.view1 == third.view1 && again.bool_masked_pos == third.bool_masked_pos && loader.position() == 2);

    // Batches feed the trainer of a model with the same grid.
    const char* config = "{\"hidden_size\": 32, \"num_hidden_layers\": 1, \"num_attention_heads\": 4, "
                         "\"intermediate_size\": 64, \"image_size\": 8, \"patch_size\": 4, \"num_channels\": 3, "
                         "\"vocab_size\": 32, \"use_mask_token\": true}";
    beit::Trainer trainer = beit::Trainer::create_from_config(ctx, config, 1);
    o.drop_last = true;
    beit::Loader train = beit::Loader::create(ctx, path, o);
    for (int s = 0; s < 3; s++) {
        train.next(b);
        const beit::StepStats stats = trainer.step(b.mim_batch());
        CHECK(stats.step == std::uint64_t(s + 1) && stats.loss == stats.loss);
    }
    CHECK(trainer.data_position() == train.position());

    beit::LoaderOptions bad = o;
    bad.token_source = static_cast<beit_token_source>(9);
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { beit::Loader::create(ctx, path, bad); },
                                             "an unknown token source", "token_source 9");
    bad = o;
    bad.flip_prob = 0.5;
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { beit::Loader::create(ctx, path, bad); },
                                             "flips with cached tokens", "whole");
    expect_throw<beit::IoError>(BEIT_ERR_IO, [&] { beit::Loader::create(ctx, dir + "/missing", o); }, "a missing file", "missing");
}

void test_mask_generator() {
    beit::MaskGeneratorOptions o = beit::MaskGenerator::default_options();
    o.grid_height = o.grid_width = 14;
    o.seed = 5;
    beit::MaskGenerator a = beit::MaskGenerator::create(o), b = beit::MaskGenerator::create(o);
    std::vector<std::uint8_t> ma, mb;
    for (int r = 0; r < 30; r++) {
        const std::size_t ca = a.next(ma), cb = b.next(mb);
        CHECK(ma == mb && ca == cb && ca <= 75 && ca >= 1 && ma.size() == 196);
        std::size_t ones = 0;
        for (std::uint8_t v : ma) ones += v;
        CHECK(ones == ca);
    }
    std::vector<std::uint8_t> small(195);
    expect_throw<beit::BufferSizeError>(BEIT_ERR_BUFFER_SIZE, [&] { a.next(beit::span<std::uint8_t>(small)); }, "a short mask", "len is 195");
    o.masked_patches = 196;
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { beit::MaskGenerator::create(o); },
                                             "every patch masked", "masked_patches is 196");
    beit::MaskGenerator moved = std::move(a);
    expect_throw<beit::NullPointerError>(BEIT_ERR_NULL_POINTER, [&] { a.next(ma); }, "a moved-from generator", "MaskGenerator");
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s <repository root>\n", argv[0]);
        return 2;
    }
    char name[] = "/tmp/beit-cpp-data-XXXXXX";
    if (!mkdtemp(name)) return 2;
    dir = name;
    run("writer", test_writer);
    run("import", test_import);
    run("loader", test_loader);
    run("mask_generator", test_mask_generator);
    const std::string cmd = "rm -rf '" + dir + "'";
    if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "warning: cannot remove %s\n", dir.c_str());
    return support::summary();
}

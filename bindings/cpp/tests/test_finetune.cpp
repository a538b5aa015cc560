// Tests of beit.hpp's fine-tuning, evaluation and segmentation wrappers against libbeit, with
// the `beit` CLI as the reference; standard library and POSIX only.
//
//   test_finetune <repository root> <beit CLI> [test name...]
//
// Trainer::finetune on a classifier from Model::to_classifier gives the model.safetensors of
// `beit finetune` byte for byte, also when stopped by its progress function, checkpointed and
// resumed, and at another image size (Model::with_image_size, as --image-size);
// finetune_epoch_steps is the CLI's step count for --epochs. Model::evaluate equals
// `beit eval --json`, and a classifier whose head is zeroed except one bias predicts that class
// for every image: the confusion matrix and top-1 derived by hand from the dataset's labels.
// Trainer::step_classify on a zeroed head has the hand-derived loss ln(num_labels) and the
// schedule's rates, and a checkpoint resumes it bit for bit. Model::segmentation_finetune gives
// the files, losses and test report of `beit segment finetune`, Model::evaluate_segmentation
// `beit segment eval`'s numbers, and on a head predicting one class everywhere the IoU derived
// by hand from the masks (ignore pixels unscored). A progress function's exception stops the run
// and is rethrown as itself; a trainer call from it throws BusyError; bad input throws the
// status's exception class. Context::cuda and ContextOptions::device_index are checked.
//
// Prints one line per test ("PASS name" / "FAIL name: why") and exits non-zero on any failure.
#include "support.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

namespace {

using support::expect_throw;
using support::Failure;
using support::Json;
using support::run;

std::string root;  // the repository
std::string cli;   // the beit tool
std::string dir;   // this run's scratch directory

std::string reference() { return root + "/tests/reference_finetune"; }
std::string labelled_data() { return reference() + "/train.beitds"; }
std::string pretrained() { return reference() + "/pretrained"; }

std::string text_of(const std::string& path) {
    const std::vector<unsigned char> b = support::read_file(path);
    return std::string(b.begin(), b.end());
}

void write_text(const std::string& path, const std::string& text) {
    std::ofstream(path, std::ios::binary) << text;
}

// Runs the CLI with `args` (each single-quoted) and returns its stdout; a failure carries its
// stderr. $BEIT_CLI_WRAPPER, when set, is put before the command: under valgrind the CLI must
// run under valgrind too, since valgrind hides AVX-512 from both processes alike (the matrix
// kernels, and with them the bits, follow the CPU features the program sees).
std::string run_cli(const std::vector<std::string>& args) {
    const char* wrapper = std::getenv("BEIT_CLI_WRAPPER");
    std::string cmd = (wrapper ? std::string(wrapper) + " " : std::string()) + "'" + cli + "'";
    for (const std::string& a : args) cmd += " '" + a + "'";
    const std::string err = dir + "/cli.stderr";
    cmd += " 2>'" + err + "'";
    FILE* p = popen(cmd.c_str(), "r");
    if (!p) throw Failure{"cannot run " + cmd};
    std::string out;
    char buf[4096];
    for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
    const int status = pclose(p);
    if (status != 0) throw Failure{cmd + " failed: " + text_of(err)};
    return out;
}

// The last line of `out` (the CLI's closing JSON summary) parsed.
Json last_json_line(const std::string& out) {
    std::size_t end = out.find_last_not_of('\n');
    CHECK(end != std::string::npos);
    const std::size_t begin = out.rfind('\n', end);
    return support::parse_json(out.substr(begin == std::string::npos ? 0 : begin + 1, end + 1 - (begin + 1)));
}

// The two model directories hold the same model.safetensors, byte for byte.
void same_weights(const std::string& a, const std::string& b) {
    const auto wa = support::read_file(a + "/model.safetensors");
    const auto wb = support::read_file(b + "/model.safetensors");
    if (wa != wb) throw Failure{a + "/model.safetensors and " + b + "/model.safetensors differ"};
}

// The labels of every sample of a dataset file, read through beit::Dataset.
std::vector<std::uint32_t> labels_of(const std::string& path) {
    const beit::Dataset ds = beit::Dataset::open(path);
    std::vector<std::uint32_t> labels;
    for (std::uint64_t i = 0; i < ds.size(); i++) {
        const beit::Sample s = ds.read(i);
        CHECK(s.meta.label_written);
        labels.push_back(s.meta.label);
    }
    return labels;
}

constexpr std::size_t kLabels = 3;  // the classes of train.beitds

// ---- classification

void test_finetune_matches_the_cli_and_resumes() {
    const std::string out = run_cli({"finetune", "--model", pretrained(), "--data", labelled_data(), "--out",
                                     dir + "/ft_cli", "--epochs", "2", "--batch", "8", "--seed", "3",
                                     "--label-fraction", "0.5", "--threads", "2", "--log-every", "1000"});
    const std::uint64_t steps = std::uint64_t(last_json_line(out).at("steps").num());
    // --epochs 2 takes two epochs of the labelled half: finetune_epoch_steps says how many.
    CHECK(steps == 2 * beit::finetune_epoch_steps(labelled_data(), 8, 0.5, 3));
    CHECK(beit::finetune_epoch_steps(labelled_data(), 8) == labels_of(labelled_data()).size() / 8);

    const beit::Context ctx = beit::Context::cpu(2);
    const beit::Model mim = beit::Model::load(ctx, pretrained());
    const beit::Model cls = mim.to_classifier(ctx, kLabels, 0.1, 3);
    CHECK(cls.info().architecture == BEIT_ARCH_IMAGE_CLASSIFICATION && cls.info().num_labels == kLabels);
    CHECK(mim.info().architecture == BEIT_ARCH_MASKED_IMAGE_MODELING);  // only read

    beit::TrainerOptions topts = beit::finetune_trainer_options(steps);
    CHECK(topts.total_steps == steps && topts.warmup_steps == steps / 10 && topts.learning_rate == 1e-3 &&
          topts.layer_decay == 0.65 && topts.beta2 == 0.999 && topts.drop_path_rate == 0.1);
    topts.seed = 3;  // `beit finetune --seed` seeds the trainer too
    beit::FinetuneOptions o = beit::default_finetune_options();
    CHECK(o.batch_size == 64 && o.label_fraction == 1.0 && o.steps == 0);
    o.batch_size = 8;
    o.seed = 3;
    o.label_fraction = 0.5;
    o.scratch_dir = dir.c_str();

    std::vector<std::uint64_t> seen;
    {
        beit::Trainer t = beit::Trainer::create(ctx, cls, topts);
        t.finetune(labelled_data(), o, [&](const beit::StepStats& s) {
            seen.push_back(s.step);
            return false;
        });
        CHECK(t.step_count() == steps);
        t.save_model(dir + "/ft_cpp");
    }
    CHECK(seen.size() == steps && seen.front() == 1 && seen.back() == steps);
    same_weights(dir + "/ft_cli", dir + "/ft_cpp");

    // Stopped by the progress function at step 2, checkpointed, resumed in a fresh trainer.
    {
        beit::Trainer t = beit::Trainer::create(ctx, cls, topts);
        t.finetune(labelled_data(), o, [](const beit::StepStats& s) { return s.step >= 2; });
        CHECK(t.step_count() == 2);
        t.save_checkpoint(dir + "/ft_ckpt");
    }
    beit::Trainer resumed = beit::Trainer::create(ctx, cls, beit::finetune_trainer_options(steps));
    resumed.load_checkpoint(dir + "/ft_ckpt");
    resumed.finetune(labelled_data(), o);
    CHECK(resumed.step_count() == steps);
    resumed.save_model(dir + "/ft_resumed");
    same_weights(dir + "/ft_cli", dir + "/ft_resumed");
}

void test_with_image_size_matches_the_cli() {
    run_cli({"finetune", "--model", pretrained(), "--data", labelled_data(), "--out", dir + "/big_cli",
             "--image-size", "20", "--steps", "3", "--batch", "8", "--seed", "1", "--threads", "2"});
    const beit::Context ctx = beit::Context::cpu(2);
    const beit::Model cls = beit::Model::load(ctx, pretrained()).to_classifier(ctx, kLabels, 0.1, 1);
    const beit::Model big = cls.with_image_size(ctx, 20, 20);
    CHECK(big.info().image_height == 20 && big.info().image_width == 20 && cls.info().image_height == 16);
    beit::TrainerOptions topts = beit::finetune_trainer_options(3);
    topts.seed = 1;
    beit::Trainer t = beit::Trainer::create(ctx, big, topts);
    beit::FinetuneOptions o = beit::default_finetune_options();
    o.batch_size = 8;
    o.seed = 1;
    t.finetune(labelled_data(), o);  // steps 0: the trainer's total_steps
    t.save_model(dir + "/big_cpp");
    same_weights(dir + "/big_cli", dir + "/big_cpp");

    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { cls.with_image_size(ctx, 2, 2); },
                                             "an image smaller than a patch");
}

struct Boom : std::runtime_error {
    explicit Boom(std::uint64_t step) : std::runtime_error("boom at step " + std::to_string(step)), step(step) {}
    std::uint64_t step;
};

void test_progress_exceptions_and_busy() {
    const beit::Context ctx = beit::Context::cpu(2);
    beit::Model cls =
        beit::Model::create_classifier(ctx, text_of(pretrained() + "/config.json"), kLabels, 0.1, 1);
    CHECK(cls.info().architecture == BEIT_ARCH_IMAGE_CLASSIFICATION && cls.info().num_labels == kLabels);
    beit::Trainer t = beit::Trainer::create(ctx, cls, beit::finetune_trainer_options(7));
    beit::FinetuneOptions o = beit::default_finetune_options();
    o.batch_size = 8;
    try {
        t.finetune(labelled_data(), o, [](const beit::StepStats& s) -> bool { throw Boom(s.step); });
        throw Failure{"the progress function's exception did not come through"};
    } catch (const Boom& b) {
        CHECK(b.step == 1);
    }
    CHECK(t.step_count() == 1);  // the run stopped after the step that threw
    // A call on the trainer from its own progress function is refused, not a deadlock.
    expect_throw<beit::BusyError>(BEIT_ERR_BUSY, [&] {
        t.finetune(labelled_data(), o, [&](const beit::StepStats&) { return t.step_count() > 0; });
    }, "a trainer call from progress");
    CHECK(t.step_count() == 2);
    o.label_fraction = 0;
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { t.finetune(labelled_data(), o); },
                                             "label_fraction 0", "label fraction");
    o.label_fraction = 1;
    expect_throw<beit::IoError>(BEIT_ERR_IO, [&] { t.finetune(dir + "/missing.beitds", o); }, "missing data",
                                "missing.beitds");
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT,
                                             [&] { beit::finetune_epoch_steps(labelled_data(), 0); }, "batch 0",
                                             "batch size");
    CHECK(t.step_count() == 2);  // refused runs took no step
    const beit::Model moved = std::move(cls);
    expect_throw<beit::NullPointerError>(BEIT_ERR_NULL_POINTER, [&] { cls.to_classifier(ctx, 2); }, "moved-from",
                                         "Model");
}

// A classifier trainer on `ctx` whose head (classifier weight and bias) is zero.
beit::Trainer zero_head_trainer(const beit::Context& ctx, const beit::TrainerOptions& options) {
    const beit::Model cls =
        beit::Model::create_classifier(ctx, text_of(pretrained() + "/config.json"), kLabels, 0.1, 2);
    beit::Trainer t = beit::Trainer::create(ctx, cls, options);
    for (const char* name : {"classifier.weight", "classifier.bias"}) {
        const beit::Tensor p = t.parameter(name);
        t.set_parameter(name, std::vector<float>(p.size(), 0.0f));
    }
    return t;
}

void test_step_classify() {
    const beit::Context ctx = beit::Context::cpu(2);
    std::vector<float> pixels(4 * 16 * 16);
    for (std::size_t i = 0; i < pixels.size(); i++) pixels[i] = float(std::sin(0.7 * double(i)));
    const std::vector<std::int64_t> labels = {0, 2, 1, 2};
    beit::ClassifyBatch b;
    b.pixels = pixels;
    b.batch = 4;
    b.channels = 1;
    b.height = b.width = 16;
    b.labels = labels;

    const beit::TrainerOptions opts = beit::finetune_trainer_options(10);  // warmup 1, cosine over 9
    beit::Trainer a = zero_head_trainer(ctx, opts);
    beit::Trainer twin = zero_head_trainer(ctx, opts);
    // Zero logits: softmax is uniform, so the cross-entropy is ln K whatever the smoothing.
    const beit::StepStats s1 = a.step_classify(b);
    CHECK(s1.step == 1 && s1.masked == 0);
    CHECK(std::fabs(s1.loss - std::log(double(kLabels))) < 1e-6);
    CHECK(s1.lr == 1e-3);  // the one warmup step reaches the peak
    CHECK(twin.step_classify(b).loss == s1.loss);
    a.save_checkpoint(dir + "/cls_ckpt");
    std::vector<beit::StepStats> after;
    for (int k = 0; k < 2; k++) after.push_back(a.step_classify(b, 0.0f));
    // Steps 2 and 3 follow the cosine from the peak: 1e-6 + (1e-3 - 1e-6) (1 + cos(pi i / 9)) / 2.
    const double pi = std::acos(-1.0);
    for (int i = 0; i < 2; i++) {
        const double want = 1e-6 + 0.5 * (1e-3 - 1e-6) * (1.0 + std::cos(pi * i / 9.0));
        CHECK(std::fabs(after[std::size_t(i)].lr - want) <= 1e-15);
    }
    a.load_checkpoint(dir + "/cls_ckpt");
    for (int k = 0; k < 2; k++) {
        const beit::StepStats s = a.step_classify(b, 0.0f);
        CHECK(s.loss == after[std::size_t(k)].loss && s.grad_norm == after[std::size_t(k)].grad_norm);
    }

    const std::vector<std::int64_t> bad_label = {0, 1, 2, 3};
    beit::ClassifyBatch bad = b;
    bad.labels = bad_label;
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { a.step_classify(bad); },
                                             "label 3", "3");
    bad.labels = beit::span<const std::int64_t>(labels.data(), 3);
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { a.step_classify(bad); },
                                             "3 labels for 4 images", "labels_len");
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { a.step_classify(b, 1.0f); },
                                             "label smoothing 1", "label smoothing");
    CHECK(a.step_count() == 3);  // refused steps changed nothing

    const char* mim_config = R"({"image_size": 16, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 32, "num_channels": 1, "vocab_size": 8,
        "use_mask_token": true})";
    beit::Trainer mim = beit::Trainer::create_from_config(ctx, mim_config, 1);
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { mim.step_classify(b); },
                                             "a pretraining trainer", "BeitForImageClassification");
}

void test_evaluate() {
    const beit::Context ctx = beit::Context::cpu(2);
    const beit::Model mim = beit::Model::load(ctx, pretrained());
    const beit::Model cls = mim.to_classifier(ctx, kLabels, 0.1, 4);
    cls.save(dir + "/eval_cls");
    const beit::Evaluation e = cls.evaluate(ctx, labelled_data(), 7);
    const Json want = support::parse_json(
        run_cli({"eval", "--model", dir + "/eval_cls", "--data", labelled_data(), "--json", "--threads", "2"}));
    CHECK(e.images == std::uint64_t(want.at("images").num()) && e.correct == std::uint64_t(want.at("correct").num()));
    CHECK(e.top1 == want.at("top1").num() && e.num_labels == kLabels);
    CHECK((e.confusion.shape == std::vector<std::size_t>{kLabels, kLabels}));
    const beit::BasicTensor<double> acc = e.per_class_accuracy();
    CHECK((acc.shape == std::vector<std::size_t>{kLabels}));
    for (std::size_t t = 0; t < kLabels; t++) {
        CHECK(acc.data[t] == want.at("per_class_accuracy").at(t).num());
        for (std::size_t p = 0; p < kLabels; p++) {
            CHECK(e.confusion.data[t * kLabels + p] == std::uint64_t(want.at("confusion").at(t).at(p).num()));
        }
    }

    // A head of zero weights and bias e_1 predicts class 1 for every image: row t of the
    // confusion matrix is [0, count(t), 0], top-1 the share of label 1.
    beit::Model ones = mim.to_classifier(ctx, kLabels, 0.1, 4);
    ones.set_parameter("classifier.weight", std::vector<float>(ones.parameter("classifier.weight").size(), 0.0f));
    ones.set_parameter("classifier.bias", std::vector<float>{0.0f, 1.0f, 0.0f});
    const std::vector<std::uint32_t> labels = labels_of(labelled_data());
    std::vector<std::uint64_t> count(kLabels, 0);
    for (std::uint32_t l : labels) count.at(l)++;
    const beit::Evaluation h = ones.evaluate(ctx, labelled_data(), 5);
    CHECK(h.images == labels.size() && h.correct == count[1]);
    CHECK(h.top1 == double(count[1]) / double(labels.size()));
    for (std::size_t t = 0; t < kLabels; t++) {
        for (std::size_t p = 0; p < kLabels; p++) CHECK(h.confusion.data[t * kLabels + p] == (p == 1 ? count[t] : 0));
        CHECK(h.per_class_accuracy().data[t] == (t == 1 ? 1.0 : 0.0));
    }

    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { mim.evaluate(ctx, labelled_data()); },
                                             "a MIM model", "BeitForImageClassification");
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { cls.evaluate(ctx, labelled_data(), 0); },
                                             "batch 0", "batch size");
    expect_throw<beit::IoError>(BEIT_ERR_IO, [&] { cls.evaluate(ctx, dir + "/missing.beitds"); }, "missing data",
                                "missing.beitds");
    const beit::Context empty;
    expect_throw<beit::NullPointerError>(BEIT_ERR_NULL_POINTER, [&] { cls.evaluate(empty, labelled_data()); },
                                         "empty context", "empty beit::");
}

// ---- segmentation

constexpr std::size_t kSegSamples = 16, kSegSize = 16;

// 16 grey 16x16 images with a bright 8x8 square; mask 1 on it, 0 elsewhere, and the ignore
// index 255 on the first row. Returns the mask pixels of class 0 and 1 over all samples.
std::pair<std::uint64_t, std::uint64_t> write_squares(const std::string& path) {
    const std::size_t px = kSegSize * kSegSize;
    std::vector<std::uint8_t> pixels(kSegSamples * px, 30), masks(kSegSamples * px, 0);
    std::uint64_t n0 = 0, n1 = 0;
    for (std::size_t i = 0; i < kSegSamples; i++) {
        const std::size_t y0 = i % 7 + 1, x0 = (3 * i) % 7;
        for (std::size_t y = 0; y < kSegSize; y++) {
            for (std::size_t x = 0; x < kSegSize; x++) {
                const bool inside = y >= y0 && y < y0 + 8 && x >= x0 && x < x0 + 8;
                std::uint8_t& m = masks[i * px + y * kSegSize + x];
                if (inside) pixels[i * px + y * kSegSize + x] = 200;
                m = y == 0 ? 255 : inside ? 1 : 0;
                n0 += m == 0;
                n1 += m == 1;
            }
        }
    }
    beit::DatasetSpec spec = beit::DatasetWriter::default_spec();
    spec.height = spec.width = kSegSize;
    spec.channels = 1;
    spec.has_masks = true;
    beit::DatasetWriter w = beit::DatasetWriter::create(path, spec);
    beit::Samples s;
    s.count = kSegSamples;
    s.pixels = pixels;
    s.masks = masks;
    w.append(s);
    w.finish();
    return {n0, n1};
}

const char* const kSegConfig = R"({"image_size": 16, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 2,
 "num_attention_heads": 2, "intermediate_size": 64, "num_channels": 1, "use_relative_position_bias": true,
 "pool_scales": [1, 2], "auxiliary_channels": 16, "drop_path_rate": 0.1})";

// `beit segment finetune`'s and `beit segment eval`'s per_class_iou (null: NaN) equal `got`.
void same_iou(const beit::BasicTensor<double>& got, const Json& want) {
    CHECK(got.shape.size() == 1 && got.shape[0] == want.items.size());
    for (std::size_t k = 0; k < got.data.size(); k++) {
        const Json& w = want.at(k);
        CHECK(w.kind == Json::Null ? std::isnan(got.data[k]) : got.data[k] == w.num());
    }
}

void test_segmentation_matches_the_cli() {
    const std::string data = dir + "/squares.beitds";
    write_squares(data);
    write_text(dir + "/seg_config.json", kSegConfig);
    const Json report = support::parse_json(run_cli(
        {"segment", "finetune", "--config", dir + "/seg_config.json", "--data", data, "--out", dir + "/seg_cli",
         "--epochs", "2", "--batch-size", "4", "--threads", "2", "--seed", "5", "--warmup-steps", "2",
         "--test-fraction", "0.25"}));

    const beit::Context ctx = beit::Context::cpu(2);
    const beit::Model seg = beit::Model::create_segmenter(ctx, kSegConfig, 2, 5);
    CHECK(seg.info().architecture == BEIT_ARCH_SEMANTIC_SEGMENTATION && seg.info().num_labels == 2);
    beit::SegmentationOptions o = beit::default_segmentation_options();
    CHECK(o.epochs == 10 && o.batch_size == 16 && o.test_fraction == 0.2 && o.mean == nullptr);
    o.epochs = 2;
    o.batch_size = 4;
    o.seed = 5;
    o.warmup_steps = 2;
    o.test_fraction = 0.25;
    std::vector<double> losses;
    std::uint64_t last_total = 0;
    const beit::SegmentationResult r = seg.segmentation_finetune(ctx, data, o, [&](const beit::SegmentationStep& s) {
        losses.push_back(s.loss);
        last_total = s.total_steps;
        return false;
    });
    r.model.save(dir + "/seg_cpp");
    same_weights(dir + "/seg_cli", dir + "/seg_cpp");
    CHECK(r.report.steps == std::uint64_t(report.at("steps").num()) && last_total == r.report.steps);
    CHECK(r.report.train_samples == 12 && r.report.test_samples == 4);
    CHECK(r.report.final_epoch_loss == report.at("final_epoch_loss").num());
    CHECK(losses.size() == report.at("losses").items.size());
    for (std::size_t k = 0; k < losses.size(); k++) CHECK(losses[k] == report.at("losses").at(k).num());

    beit::SegmentationEvalOptions eo = beit::default_segmentation_eval_options();
    CHECK(eo.split == BEIT_SPLIT_TEST && eo.batch_size == 32 && std::string(beit::split_name(eo.split)) == "test");
    eo.test_fraction = 0.25;
    const beit::SegmentationEvaluation test = r.model.evaluate_segmentation(ctx, data, eo);
    CHECK(test.samples == 4 && test.num_labels == 2);
    CHECK(test.mean_iou == report.at("test").at("mean_iou").num());
    CHECK(test.pixel_accuracy == report.at("test").at("pixel_accuracy").num());
    same_iou(test.per_class_iou, report.at("test").at("per_class_iou"));

    // Every sample, batches of 5, the mean given explicitly: `beit segment eval --split-name all`.
    const Json all = support::parse_json(run_cli({"segment", "eval", "--model", dir + "/seg_cli", "--data", data,
                                                  "--split-name", "all", "--batch-size", "5", "--mean", "0.5",
                                                  "--threads", "2"}));
    const float mean[] = {0.5f};
    eo.split = BEIT_SPLIT_ALL;
    eo.batch_size = 5;
    eo.mean = mean;
    eo.mean_len = 1;
    const beit::SegmentationEvaluation every = r.model.evaluate_segmentation(ctx, data, eo);
    CHECK(every.samples == kSegSamples && every.samples == std::uint64_t(all.at("samples").num()));
    CHECK(every.mean_iou == all.at("mean_iou").num() && every.pixel_accuracy == all.at("pixel_accuracy").num());
    same_iou(every.per_class_iou, all.at("per_class_iou"));
}

void test_segmentation_progress_and_errors() {
    const std::string data = dir + "/squares_p.beitds";
    write_squares(data);
    const beit::Context ctx = beit::Context::cpu(2);
    const beit::Model seg = beit::Model::create_segmenter(ctx, kSegConfig, 2, 5);
    beit::SegmentationOptions o = beit::default_segmentation_options();
    o.epochs = 1;  // 3 steps of 4 of the 12 training samples
    o.batch_size = 4;
    const beit::SegmentationResult stopped =
        seg.segmentation_finetune(ctx, data, o, [](const beit::SegmentationStep& s) { return s.step >= 2; });
    CHECK(stopped.model && stopped.report.steps == 2);
    try {
        seg.segmentation_finetune(ctx, data, o, [](const beit::SegmentationStep& s) -> bool { throw Boom(s.step); });
        throw Failure{"the progress function's exception did not come through"};
    } catch (const Boom& b) {
        CHECK(b.step == 1);
    }

    const beit::Model mim = beit::Model::load(ctx, pretrained());
    const beit::Model s2 = mim.to_segmenter(ctx, 2);
    CHECK(s2.info().architecture == BEIT_ARCH_SEMANTIC_SEGMENTATION && s2.info().num_labels == 2);
    o.batch_size = 1;
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { s2.segmentation_finetune(ctx, data, o); },
                                             "batch 1", "batch size");
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT,
                                             [&] { mim.segmentation_finetune(ctx, data); }, "a MIM model",
                                             "BeitForSemanticSegmentation");
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT,
                                             [&] { mim.evaluate_segmentation(ctx, data); }, "a MIM model",
                                             "BeitForSemanticSegmentation");
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT,
                                             [&] { mim.to_segmenter(ctx, 0); }, "0 labels", "num_labels");
    beit::SegmentationEvalOptions eo = beit::default_segmentation_eval_options();
    eo.split = static_cast<beit_split>(7);
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT,
                                             [&] { s2.evaluate_segmentation(ctx, data, eo); }, "split 7", "7");
    CHECK(std::string(beit::split_name(eo.split)) == "unknown");
    // The labelled data has no masks.
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT,
                                             [&] { s2.evaluate_segmentation(ctx, labelled_data()); }, "no masks",
                                             "mask");
}

void test_segmentation_evaluation_by_hand() {
    const std::string data = dir + "/squares_h.beitds";
    const auto [n0, n1] = write_squares(data);
    const beit::Context ctx = beit::Context::cpu(2);
    beit::Model seg = beit::Model::create_segmenter(ctx, kSegConfig, 2, 9);
    // The decode head's last 1x1 convolution: zero weights, bias e_1, so every pixel is class 1.
    seg.set_parameter("decode_head.classifier.weight",
                      std::vector<float>(seg.parameter("decode_head.classifier.weight").size(), 0.0f));
    seg.set_parameter("decode_head.classifier.bias", std::vector<float>{0.0f, 1.0f});
    beit::SegmentationEvalOptions eo = beit::default_segmentation_eval_options();
    eo.split = BEIT_SPLIT_ALL;
    const beit::SegmentationEvaluation e = seg.evaluate_segmentation(ctx, data, eo);
    // Scored pixels: n0 + n1 (the ignore row is not scored); class 1 is right on its n1 pixels,
    // so IoU(1) = n1 / (n0 + n1), IoU(0) = 0 / n0, the mean over the two present classes.
    const double scored = double(n0 + n1);
    CHECK(e.samples == kSegSamples && e.num_labels == 2);
    CHECK(std::fabs(e.pixel_accuracy - double(n1) / scored) < 1e-12);
    CHECK(e.per_class_iou.data.size() == 2 && e.per_class_iou.data[0] == 0.0);
    CHECK(std::fabs(e.per_class_iou.data[1] - double(n1) / scored) < 1e-12);
    CHECK(std::fabs(e.mean_iou - 0.5 * double(n1) / scored) < 1e-12);
}

// ---- the context's GPU index

// Host-fed segmentation steps: forward_backward_segment + apply_gradients is step_segment bit
// for bit, a discarded step changes nothing, and the BatchNorm running statistics are updated
// once per applied step (num_batches_tracked counts them).
void test_step_segment() {
    const beit::Context ctx = beit::Context::cpu(2);
    const beit::Model seg = beit::Model::create_segmenter(ctx, kSegConfig, 2, 5);
    beit::TrainerOptions opts = beit::Trainer::default_options();
    opts.learning_rate = 1e-3;
    beit::Trainer whole = beit::Trainer::create(ctx, seg, opts);
    beit::Trainer split = beit::Trainer::create(ctx, seg, opts);
    std::vector<float> pixels(4 * 16 * 16);
    std::vector<std::int64_t> labels(4 * 16 * 16);
    for (std::size_t i = 0; i < pixels.size(); i++) {
        pixels[i] = float(std::sin(0.37 * double(i)));
        labels[i] = i % 97 == 0 ? 255 : std::int64_t((i / 16 / (4 + i / 256)) % 2);
    }
    beit::SegBatch b;
    b.pixels = pixels;
    b.batch = 4;
    b.channels = 1;
    b.height = b.width = 16;
    b.labels = labels;
    const std::string probe = "decode_head.fpn_bottleneck.bn.running_mean";
    const beit::Tensor before = split.parameter(probe);
    split.forward_backward_segment(b);
    split.discard_gradients();
    CHECK(split.parameter(probe).data == before.data);
    for (int k = 0; k < 3; k++) {
        const beit::StepStats want = whole.step_segment(b);
        const beit::PassStats pass = split.forward_backward_segment(b);
        const beit::StepStats got = split.apply_gradients();
        CHECK(pass.loss == want.loss && pass.images == 4);
        CHECK(got.step == want.step && got.loss == want.loss && got.grad_norm == want.grad_norm && got.lr == want.lr);
    }
    for (const beit::ParameterInfo& p : whole.parameters()) CHECK(whole.parameter(p.name).data == split.parameter(p.name).data);
    CHECK(split.parameter("decode_head.fpn_bottleneck.bn.num_batches_tracked").data == std::vector<float>{3.0f});
    CHECK(split.parameter(probe).data != before.data);
    beit::SegBatch bad = b;
    bad.labels = beit::span<const std::int64_t>(labels.data(), labels.size() - 1);
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { split.step_segment(bad); },
                                             "a short label map", "labels_len");
}

void test_device_index() {
    CHECK(beit::Context::default_options().device_index == 0);
    beit::ContextOptions o = beit::Context::default_options();
    o.device = BEIT_DEVICE_CPU;
    o.device_index = 1;
    expect_throw<beit::InvalidArgumentError>(BEIT_ERR_INVALID_ARGUMENT, [&] { beit::Context c(o); },
                                             "a cpu context naming GPU 1", "device_index 1");
    // No driver has GPU 1000: cuda refuses it, auto takes the CPU (and says why).
    expect_throw<beit::UnsupportedError>(BEIT_ERR_UNSUPPORTED, [&] { beit::Context::cuda(1000); }, "GPU 1000");
    o.device = BEIT_DEVICE_AUTO;
    o.device_index = 1000;
    const beit::Context fallback(o);
    CHECK(fallback);
    if (beit::device_info().cuda_usable) {
        const beit::Context gpu = beit::Context::cuda(0, 2);
        CHECK(gpu);
    } else {
        expect_throw<beit::UnsupportedError>(BEIT_ERR_UNSUPPORTED, [&] { beit::Context::cuda(0); }, "no GPU");
    }
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s <repository root> <beit CLI> [test name...]\n", argv[0]);
        return 2;
    }
    root = argv[1];
    cli = argv[2];
    const std::vector<std::pair<const char*, void (*)()>> tests = {
        {"finetune_matches_the_cli_and_resumes", test_finetune_matches_the_cli_and_resumes},
        {"with_image_size_matches_the_cli", test_with_image_size_matches_the_cli},
        {"progress_exceptions_and_busy", test_progress_exceptions_and_busy},
        {"step_classify", test_step_classify},
        {"evaluate", test_evaluate},
        {"segmentation_matches_the_cli", test_segmentation_matches_the_cli},
        {"segmentation_progress_and_errors", test_segmentation_progress_and_errors},
        {"segmentation_evaluation_by_hand", test_segmentation_evaluation_by_hand},
        {"step_segment", test_step_segment},
        {"device_index", test_device_index},
    };
    // Names after the CLI pick tests (all of them without); an unknown name is a usage error.
    std::vector<std::pair<const char*, void (*)()>> chosen;
    for (int a = 3; a < argc; a++) {
        const auto it = std::find_if(tests.begin(), tests.end(),
                                     [&](const auto& t) { return std::strcmp(t.first, argv[a]) == 0; });
        if (it == tests.end()) {
            std::fprintf(stderr, "%s: no test is named %s\n", argv[0], argv[a]);
            return 2;
        }
        chosen.push_back(*it);
    }
    if (chosen.empty()) chosen = tests;
    beit::check_abi();
    char name[] = "/tmp/beit-cpp-finetune-XXXXXX";
    if (!mkdtemp(name)) return 2;
    dir = name;
    for (const auto& t : chosen) run(t.first, t.second);
    const std::string cmd = "rm -rf '" + dir + "'";
    if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "warning: cannot remove %s\n", dir.c_str());
    return support::summary();
}

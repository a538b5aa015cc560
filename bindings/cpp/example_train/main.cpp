// BEiT end to end through beit.hpp: makes its own datasets from generated images, pretrains a
// tiny BEiT by masked image modeling for 10 steps on batches of the library's loader (crops,
// block-wise masks, and the visual tokens stored in the dataset), turns it into a classifier,
// fine-tunes that for 10 steps as `beit finetune` does, and evaluates it on held-out images.
//
//   beit_train_example [work dir]     (default: <temp>/beit_train_example; the datasets go there)
//
// The images are 16x16 grey pictures of three kinds (the labels): horizontal stripes, vertical
// stripes and checkerboards, each with a random period, phase and noise. A patch's visual token
// is its mean brightness in 16 steps, the target a real tokenizer would provide. Ten steps of
// each stage only show the calls: the top-1 stays near chance (1/3); raise kSteps to learn more.
#include <beit.hpp>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr std::uint32_t kSize = 16, kPatch = 4, kGrid = kSize / kPatch, kVocab = 16, kClasses = 3;
constexpr std::uint64_t kSteps = 10;

const char* const kConfig = R"({"image_size": 16, "patch_size": 4, "num_channels": 1,
  "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
  "vocab_size": 16, "use_mask_token": true, "use_shared_relative_position_bias": true,
  "layer_scale_init_value": 0.1})";

// One image of class `label` into `pixels` (kSize x kSize bytes).
void draw(std::uint32_t label, std::mt19937& rng, std::uint8_t* pixels) {
    const std::uint32_t period = 2 + rng() % 4, phase = rng() % period;
    for (std::uint32_t y = 0; y < kSize; y++) {
        for (std::uint32_t x = 0; x < kSize; x++) {
            const std::uint32_t column = (x + phase) / period, row = (y + phase) / period;
            const bool on = label == 0 ? row % 2 == 0 : label == 1 ? column % 2 == 0 : (row + column) % 2 == 0;
            const int noise = int(rng() % 41) - 20;
            pixels[y * kSize + x] = std::uint8_t((on ? 200 : 50) + noise);
        }
    }
}

// Writes `count` generated images to `path`, with their labels and/or visual tokens.
void write_dataset(const std::string& path, std::size_t count, bool labels, bool tokens, std::uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<std::uint8_t> pixels(count * kSize * kSize);
    std::vector<std::uint32_t> label(count);
    std::vector<std::uint16_t> token(count * kGrid * kGrid);
    for (std::size_t i = 0; i < count; i++) {
        label[i] = std::uint32_t(i % kClasses);
        std::uint8_t* image = pixels.data() + i * kSize * kSize;
        draw(label[i], rng, image);
        for (std::uint32_t gy = 0; gy < kGrid; gy++) {
            for (std::uint32_t gx = 0; gx < kGrid; gx++) {
                std::uint32_t sum = 0;
                for (std::uint32_t y = 0; y < kPatch; y++) {
                    const std::uint8_t* row = image + (gy * kPatch + y) * kSize + gx * kPatch;
                    for (std::uint32_t x = 0; x < kPatch; x++) sum += row[x];
                }
                token[(i * kGrid + gy) * kGrid + gx] = std::uint16_t(sum / (kPatch * kPatch) * kVocab / 256);
            }
        }
    }
    beit::DatasetSpec spec = beit::DatasetWriter::default_spec();
    spec.height = spec.width = kSize;
    spec.channels = 1;
    spec.has_labels = labels;
    spec.has_tokens = tokens;
    spec.token_grid_h = spec.token_grid_w = tokens ? kGrid : 0;
    beit::DatasetWriter writer = beit::DatasetWriter::create(path, spec);
    beit::Samples samples;
    samples.count = count;
    samples.pixels = pixels;
    if (labels) samples.labels = label;
    if (tokens) samples.tokens = token;
    writer.append(samples);
    const beit::DatasetInfo info = writer.finish();
    std::printf("wrote %s: %llu images%s%s\n", path.c_str(), static_cast<unsigned long long>(info.count),
                labels ? ", labels" : "", tokens ? ", tokens" : "");
}

}  // namespace

int main(int argc, char** argv) {
    if (argc > 2) {
        std::fprintf(stderr, "usage: %s [work dir]\n", argv[0]);
        return 2;
    }
    try {
        beit::check_abi();
        const std::filesystem::path work =
            argc == 2 ? std::filesystem::path(argv[1]) : std::filesystem::temp_directory_path() / "beit_train_example";
        std::filesystem::create_directories(work);
        const std::string pretrain_data = (work / "pretrain.beitds").string();
        const std::string train_data = (work / "train.beitds").string();
        const std::string test_data = (work / "test.beitds").string();
        write_dataset(pretrain_data, 192, false, true, 1);
        write_dataset(train_data, 96, true, false, 2);
        write_dataset(test_data, 48, true, false, 3);

        const beit::Context ctx = beit::Context::cpu();

        // Pretraining: a fresh masked-image-modeling model, fed by the loader. With the dataset's
        // tokens as targets the loader keeps each image whole (no crop or flip moves a patch
        // away from its token) and draws BEiT's block-wise masks.
        const beit::Model fresh = beit::Model::create(ctx, kConfig, BEIT_ARCH_MASKED_IMAGE_MODELING, 0);
        beit::TrainerOptions pretrain = beit::Trainer::default_options();
        pretrain.learning_rate = 1e-3;
        pretrain.warmup_steps = 2;
        pretrain.total_steps = kSteps;
        beit::Trainer mim = beit::Trainer::create(ctx, fresh, pretrain);
        beit::LoaderOptions lo = beit::Loader::default_options();
        lo.model = fresh.get();
        lo.batch_size = 16;
        lo.token_source = BEIT_TOKENS_CACHED;
        lo.seed = 0;
        beit::Loader loader = beit::Loader::create(ctx, pretrain_data, lo);
        beit::LoaderBatch batch;
        for (std::uint64_t s = 0; s < kSteps; s++) {
            loader.next(batch);  // view1 [16, 1, 16, 16], bool_masked_pos [16, 16], tokens [16, 16]
            const beit::StepStats st = mim.step(batch.mim_batch());
            std::printf("pretrain step %2llu: loss %.4f on %zu masked patches\n",
                        static_cast<unsigned long long>(st.step), st.loss, st.masked);
        }

        // Fine-tuning: BEiT's classifier start (backbone kept, fresh head), `beit finetune`'s
        // recipe and data pipeline for 10 steps.
        const beit::Model classifier = mim.model().to_classifier(ctx, kClasses, 0.1, 0);
        beit::Trainer cls = beit::Trainer::create(ctx, classifier, beit::finetune_trainer_options(kSteps));
        beit::FinetuneOptions fo = beit::default_finetune_options();
        fo.batch_size = 16;
        cls.finetune(train_data, fo, [](const beit::StepStats& st) {
            std::printf("finetune step %2llu: loss %.4f, lr %.2e\n", static_cast<unsigned long long>(st.step), st.loss,
                        st.lr);
            return false;  // true would stop the run here
        });

        // Evaluation on the held-out images.
        const beit::Evaluation e = cls.model().evaluate(ctx, test_data);
        std::printf("top-1 %.4f (%llu of %llu test images)\nconfusion (rows: true class, columns: predicted):\n",
                    e.top1, static_cast<unsigned long long>(e.correct), static_cast<unsigned long long>(e.images));
        for (std::size_t t = 0; t < e.num_labels; t++) {
            for (std::size_t p = 0; p < e.num_labels; p++) {
                std::printf(" %4llu", static_cast<unsigned long long>(e.confusion.data[t * e.num_labels + p]));
            }
            std::printf("\n");
        }
    } catch (const beit::Error& e) {
        std::fprintf(stderr, "beit_train_example: %s\n", e.what());
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "beit_train_example: %s\n", e.what());
        return 1;
    }
    return 0;
}

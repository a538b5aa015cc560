// Loads a model directory (config.json + model.safetensors), runs it on a synthetic batch of one
// image of the configured size and prints the logits (or, for a backbone, the CLS token).
//   beit_example <model dir>
#include <beit.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s <model dir>\n", argv[0]);
        return 2;
    }
    try {
        beit::check_abi();
        const beit::Context ctx = beit::Context::cpu();
        const beit::Model model = beit::Model::load(ctx, argv[1]);
        const beit::ModelInfo info = model.info();
        const std::size_t c = info.num_channels, h = info.image_height, w = info.image_width;

        // A deterministic image (normalised values in [-1, 1]).
        std::vector<float> pixels(c * h * w);
        for (std::size_t i = 0; i < pixels.size(); i++) pixels[i] = std::sin(0.01f * float(i));

        beit::Images input;
        input.pixels = pixels;
        input.batch = 1;
        input.channels = c;
        input.height = h;
        input.width = w;

        const beit::OutputSizes sizes = model.output_sizes(1, h, w);
        std::vector<float> hidden(sizes.last_hidden_state_len);
        std::vector<float> logits(sizes.logits_len);
        beit::Outputs out;
        out.last_hidden_state = hidden;
        out.logits = logits;  // empty for a backbone: skipped
        model.infer(ctx, input, out);

        std::printf("libbeit %s, %zu parameters, %zux%zu input\n", beit::version().c_str(),
                    static_cast<std::size_t>(info.num_parameters), h, w);
        const std::vector<float>& shown = logits.empty() ? hidden : logits;
        const std::size_t n = logits.empty() ? info.hidden_size : shown.size();
        std::printf("%s (%zu values):", logits.empty() ? "CLS hidden state" : "logits", n);
        for (std::size_t i = 0; i < n; i++) std::printf("%s%.6g", i % 8 ? " " : "\n  ", shown[i]);
        std::printf("\n");
    } catch (const beit::Error& e) {
        std::fprintf(stderr, "beit_example: %s\n", e.what());
        return 1;
    }
    return 0;
}

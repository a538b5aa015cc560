// beit.hpp: a header-only C++17 wrapper of libbeit's C API (beit.h).
//
// - Handles (Context, Model, Trainer, Dataset, Tokenizer, DvaeTrainer) are move-only RAII
//   owners: the destructor calls the matching beit_*_free. Using a moved-from (empty) handle
//   throws beit::Error with status BEIT_ERR_NULL_POINTER; it never reaches the C library.
// - Every failing call throws beit::Error (or its subclass for the status: beit::IoError,
//   beit::BufferSizeError, ...), carrying status() and beit_last_error_message()'s text.
// - No tensor is copied: inputs are read through beit::span<const T>, outputs are written into
//   caller-owned memory (beit::span<T> or a std::vector the caller owns, resized to fit).
// - The versioned C structs come from the *_default() functions, so struct_size is always set.
//
// Requires C++17 and beit.h on the include path; link with -lbeit.
#ifndef BEIT_HPP
#define BEIT_HPP

#include "beit.h"

#include <array>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__has_include)
#if __has_include(<version>)
#include <version>
#endif
#endif
#if defined(__cpp_lib_span) && __cpp_lib_span >= 202002L
#include <span>
#define BEIT_HPP_HAS_STD_SPAN 1
#endif

namespace beit {

// ---------------------------------------------------------------------------------------------
// A minimal non-owning view of contiguous memory (std::span's subset; converts from it in C++20).

template <class T>
class span {
public:
    using element_type = T;
    using value_type = std::remove_cv_t<T>;
    using size_type = std::size_t;
    using pointer = T*;
    using iterator = T*;

    constexpr span() noexcept = default;
    constexpr span(T* data, std::size_t size) noexcept : data_(data), size_(size) {}
    template <std::size_t N>
    constexpr span(T (&array)[N]) noexcept : data_(array), size_(N) {}
    template <class U, std::size_t N,
              class = std::enable_if_t<std::is_convertible_v<U (*)[], T (*)[]>>>
    constexpr span(std::array<U, N>& array) noexcept : data_(array.data()), size_(N) {}
    template <class U, std::size_t N,
              class = std::enable_if_t<std::is_convertible_v<const U (*)[], T (*)[]>>>
    constexpr span(const std::array<U, N>& array) noexcept : data_(array.data()), size_(N) {}
    template <class U, class A, class = std::enable_if_t<std::is_convertible_v<U (*)[], T (*)[]>>>
    span(std::vector<U, A>& vector) noexcept : data_(vector.data()), size_(vector.size()) {}
    template <class U, class A,
              class = std::enable_if_t<std::is_convertible_v<const U (*)[], T (*)[]>>>
    span(const std::vector<U, A>& vector) noexcept : data_(vector.data()), size_(vector.size()) {}
    // span<T> -> span<const T>
    template <class U, class = std::enable_if_t<!std::is_same_v<U, T> &&
                                                std::is_convertible_v<U (*)[], T (*)[]>>>
    constexpr span(const span<U>& other) noexcept : data_(other.data()), size_(other.size()) {}
#ifdef BEIT_HPP_HAS_STD_SPAN
    template <class U, std::size_t E,
              class = std::enable_if_t<std::is_convertible_v<U (*)[], T (*)[]>>>
    constexpr span(std::span<U, E> s) noexcept : data_(s.data()), size_(s.size()) {}
    constexpr operator std::span<T>() const noexcept { return {data_, size_}; }
#endif

    constexpr T* data() const noexcept { return data_; }
    constexpr std::size_t size() const noexcept { return size_; }
    constexpr bool empty() const noexcept { return size_ == 0; }
    constexpr T* begin() const noexcept { return data_; }
    constexpr T* end() const noexcept { return data_ + size_; }
    constexpr T& operator[](std::size_t i) const noexcept { return data_[i]; }
    constexpr span subspan(std::size_t offset, std::size_t count) const noexcept {
        return {data_ + offset, count};
    }

private:
    T* data_ = nullptr;
    std::size_t size_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Errors

// The name of a status ("BEIT_ERR_IO", ...).
inline std::string status_name(beit_status status) { return beit_status_name(status); }

// Thrown by every failing call: status() is the beit_status, what() is
// "BEIT_ERR_...: <beit_last_error_message()>" and message() the library's text alone.
class Error : public std::runtime_error {
public:
    Error(beit_status status, const std::string& message)
        : std::runtime_error(status_name(status) + ": " + message), status_(status),
          message_(message) {}
    beit_status status() const noexcept { return status_; }
    const std::string& message() const noexcept { return message_; }

private:
    beit_status status_;
    std::string message_;
};

#define BEIT_HPP_ERROR_CLASS(Name)                                                                 \
    class Name : public Error {                                                                    \
    public:                                                                                        \
        using Error::Error;                                                                        \
    };
BEIT_HPP_ERROR_CLASS(InvalidArgumentError)  // BEIT_ERR_INVALID_ARGUMENT
BEIT_HPP_ERROR_CLASS(NullPointerError)      // BEIT_ERR_NULL_POINTER (and empty handles)
BEIT_HPP_ERROR_CLASS(IoError)               // BEIT_ERR_IO
BEIT_HPP_ERROR_CLASS(FormatError)           // BEIT_ERR_FORMAT
BEIT_HPP_ERROR_CLASS(ConfigError)           // BEIT_ERR_CONFIG
BEIT_HPP_ERROR_CLASS(UnsupportedError)      // BEIT_ERR_UNSUPPORTED
BEIT_HPP_ERROR_CLASS(BufferSizeError)       // BEIT_ERR_BUFFER_SIZE
BEIT_HPP_ERROR_CLASS(InternalError)         // BEIT_ERR_INTERNAL
BEIT_HPP_ERROR_CLASS(NumericalError)        // BEIT_ERR_NUMERICAL
BEIT_HPP_ERROR_CLASS(BusyError)             // BEIT_ERR_BUSY (a trainer in use by another thread)
#undef BEIT_HPP_ERROR_CLASS

// Throws the exception class of `status` with `message`.
[[noreturn]] inline void throw_error(beit_status status, const std::string& message) {
    switch (status) {
    case BEIT_ERR_INVALID_ARGUMENT: throw InvalidArgumentError(status, message);
    case BEIT_ERR_NULL_POINTER: throw NullPointerError(status, message);
    case BEIT_ERR_IO: throw IoError(status, message);
    case BEIT_ERR_FORMAT: throw FormatError(status, message);
    case BEIT_ERR_CONFIG: throw ConfigError(status, message);
    case BEIT_ERR_UNSUPPORTED: throw UnsupportedError(status, message);
    case BEIT_ERR_BUFFER_SIZE: throw BufferSizeError(status, message);
    case BEIT_ERR_INTERNAL: throw InternalError(status, message);
    case BEIT_ERR_NUMERICAL: throw NumericalError(status, message);
    case BEIT_ERR_BUSY: throw BusyError(status, message);
    default: throw Error(status, message);
    }
}

// Throws for a failed status (reading this thread's last error message); returns on BEIT_OK.
inline void check(beit_status status) {
    if (status != BEIT_OK) {
        const char* message = beit_last_error_message();
        throw_error(status, message ? message : "");
    }
}

// ---------------------------------------------------------------------------------------------
// Versions

inline std::string version() { return beit_version(); }
inline std::uint32_t abi_version() { return beit_abi_version(); }
// Throws beit::UnsupportedError when the loaded library's ABI differs from this header's.
inline void check_abi() {
    if (beit_abi_version() != BEIT_ABI_VERSION) {
        throw_error(BEIT_ERR_UNSUPPORTED,
                    "libbeit ABI " + std::to_string(beit_abi_version()) +
                        " loaded, this program was compiled against ABI " +
                        std::to_string(BEIT_ABI_VERSION));
    }
}

// ---------------------------------------------------------------------------------------------
// Handles

namespace detail {
// A move-only owner of a C handle freed by Free.
template <class T, void (*Free)(T*)>
class Handle {
public:
    Handle() noexcept = default;
    explicit Handle(T* raw, const char* what) noexcept : raw_(raw), what_(what) {}
    Handle(const Handle&) = delete;
    Handle& operator=(const Handle&) = delete;
    Handle(Handle&& other) noexcept : raw_(other.raw_), what_(other.what_) { other.raw_ = nullptr; }
    Handle& operator=(Handle&& other) noexcept {
        if (this != &other) {
            reset();
            raw_ = other.raw_;
            what_ = other.what_;
            other.raw_ = nullptr;
        }
        return *this;
    }
    ~Handle() { reset(); }

    void reset() noexcept {
        if (raw_) Free(raw_);
        raw_ = nullptr;
    }
    // The C handle; throws beit::NullPointerError when empty (moved from or default-built).
    T* get() const {
        if (!raw_) {
            throw_error(BEIT_ERR_NULL_POINTER,
                        std::string("use of an empty beit::") + what_ + " (moved from?)");
        }
        return raw_;
    }
    // The C handle or NULL; never throws.
    T* raw() const noexcept { return raw_; }
    // Gives up ownership.
    T* release() noexcept {
        T* raw = raw_;
        raw_ = nullptr;
        return raw;
    }
    explicit operator bool() const noexcept { return raw_ != nullptr; }

private:
    T* raw_ = nullptr;
    const char* what_ = "handle";
};

inline const char* c_str(const std::string& s) { return s.c_str(); }

template <class T>
void resize_to(std::vector<T>& v, std::size_t n) {
    if (v.size() != n) v.resize(n);
}
}  // namespace detail

using ContextOptions = beit_context_options;
using ModelInfo = beit_model_info;
using OutputSizes = beit_output_sizes;
using TokenizerInfo = beit_tokenizer_info;
using DatasetInfo = beit_dataset_info;
using TrainerOptions = beit_trainer_options;
using StepStats = beit_step_stats;

// beit_context: device, thread pool and memory budget. Thread-safe; share one among threads.
// `ContextOptions::memory_budget` (bytes; 0, the default: the memory available to the process)
// bounds what one model, trainer, inference pass or tokenizer planned on the context may need;
// a bigger one throws ConfigError (a config's size) or InvalidArgumentError (an input's).
class Context {
public:
    static ContextOptions default_options() { return beit_context_options_default(); }

    // An empty handle (every use throws); assign a real one to it.
    Context() noexcept = default;
    explicit Context(const ContextOptions& options) {
        beit_context* raw = nullptr;
        check(beit_context_create(&options, &raw));
        handle_ = Handle(raw, "Context");
    }
    static Context create(const ContextOptions& options = default_options()) {
        return Context(options);
    }
    // A CPU context with `num_threads` workers (0: one per core) and a memory budget of
    // `memory_budget` bytes (0: the memory available to the process).
    static Context cpu(std::uint32_t num_threads = 0, std::uint64_t memory_budget = 0) {
        ContextOptions o = default_options();
        o.device = BEIT_DEVICE_CPU;
        o.num_threads = num_threads;
        o.memory_budget = memory_budget;
        return Context(o);
    }

    beit_context* get() const { return handle_.get(); }
    beit_context* raw() const noexcept { return handle_.raw(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }
    void reset() noexcept { handle_.reset(); }

private:
    using Handle = detail::Handle<beit_context, beit_context_free>;
    Handle handle_;
};

// An input batch for Model::infer: NCHW f32 pixels and an optional [batch, num_patches] mask.
struct Images {
    span<const float> pixels;
    std::size_t batch = 0;
    std::size_t channels = 0;
    std::size_t height = 0;
    std::size_t width = 0;
    span<const std::uint8_t> bool_masked_pos;  // empty: none

    beit_image_batch to_c() const {
        beit_image_batch b = beit_image_batch_default();
        b.pixels = pixels.data();
        b.pixels_len = pixels.size();
        b.batch = batch;
        b.channels = channels;
        b.height = height;
        b.width = width;
        b.bool_masked_pos = bool_masked_pos.empty() ? nullptr : bool_masked_pos.data();
        b.bool_masked_pos_len = bool_masked_pos.size();
        return b;
    }
};

// Caller-owned output buffers for Model::infer; an empty span skips that output.
struct Outputs {
    span<float> last_hidden_state;
    span<float> pooler_output;
    span<float> logits;

    beit_infer_outputs to_c() const {
        beit_infer_outputs o = beit_infer_outputs_default();
        o.last_hidden_state = last_hidden_state.data();
        o.last_hidden_state_len = last_hidden_state.size();
        o.pooler_output = pooler_output.data();
        o.pooler_output_len = pooler_output.size();
        o.logits = logits.data();
        o.logits_len = logits.size();
        return o;
    }
};

// beit_model: immutable; many threads may infer with one model at once.
class Model {
public:
    Model() noexcept = default;

    // Loads a Hugging Face model directory (config.json + model.safetensors).
    static Model load(const Context& ctx, const std::string& dir) {
        beit_model* raw = nullptr;
        check(beit_model_load(ctx.get(), detail::c_str(dir), &raw));
        return Model(raw);
    }
    // A freshly initialised model from a config.json text.
    static Model create(const Context& ctx, const std::string& config_json,
                        beit_architecture architecture, std::uint64_t seed) {
        beit_model* raw = nullptr;
        check(beit_model_create(ctx.get(), detail::c_str(config_json), architecture, seed, &raw));
        return Model(raw);
    }

    void save(const std::string& dir) const { check(beit_model_save(get(), dir.c_str())); }

    ModelInfo info() const {
        ModelInfo info = beit_model_info_default();
        check(beit_model_get_info(get(), &info));
        return info;
    }
    OutputSizes output_sizes(std::size_t batch, std::size_t height, std::size_t width) const {
        OutputSizes sizes = beit_output_sizes_default();
        check(beit_model_output_sizes(get(), batch, height, width, &sizes));
        return sizes;
    }

    // Runs the model, writing into the caller's buffers (each must be empty or exactly sized:
    // see output_sizes; a wrong size throws beit::BufferSizeError, writing nothing).
    void infer(const Context& ctx, const Images& input, const Outputs& outputs) const {
        const beit_image_batch in = input.to_c();
        const beit_infer_outputs out = outputs.to_c();
        check(beit_model_infer(ctx.get(), get(), &in, &out));
    }
    // The same with the C structs (from beit_image_batch_default()/beit_infer_outputs_default()).
    void infer(const Context& ctx, const beit_image_batch& input,
               const beit_infer_outputs& outputs) const {
        check(beit_model_infer(ctx.get(), get(), &input, &outputs));
    }
    // Runs the model and writes the logits into `logits`, resized to fit (no other copy).
    void infer_logits(const Context& ctx, const Images& input, std::vector<float>& logits) const {
        (void)ctx.get();  // an empty context throws before anything else is checked
        const OutputSizes sizes = output_sizes(input.batch, input.height, input.width);
        if (sizes.logits_len == 0) {
            throw_error(BEIT_ERR_INVALID_ARGUMENT, "this model has no logits (a backbone)");
        }
        detail::resize_to(logits, sizes.logits_len);
        Outputs out;
        out.logits = logits;
        infer(ctx, input, out);
    }

    beit_model* get() const { return handle_.get(); }
    beit_model* raw() const noexcept { return handle_.raw(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }
    void reset() noexcept { handle_.reset(); }

private:
    explicit Model(beit_model* raw) noexcept : handle_(raw, "Model") {}
    detail::Handle<beit_model, beit_model_free> handle_;
};

class DvaeTrainer;

// beit_tokenizer: a visual tokenizer (dVAE encoder); immutable and thread-safe.
class Tokenizer {
public:
    Tokenizer() noexcept = default;

    static Tokenizer load(const Context& ctx, const std::string& dir) {
        beit_tokenizer* raw = nullptr;
        check(beit_tokenizer_load(ctx.get(), dir.c_str(), &raw));
        return Tokenizer(raw);
    }

    TokenizerInfo info() const {
        TokenizerInfo info = beit_tokenizer_info_default();
        check(beit_tokenizer_get_info(get(), &info));
        return info;
    }

    // `pixels`: [batch, C, S, S] in [0, 1]; `tokens`: exactly batch * tokens_per_image values.
    void tokenize(span<const float> pixels, std::size_t batch, span<std::int64_t> tokens) const {
        check(beit_tokenizer_tokenize(get(), pixels.data(), pixels.size(), batch, tokens.data(),
                                      tokens.size()));
    }
    // The same, resizing `tokens` to batch * tokens_per_image.
    void tokenize(span<const float> pixels, std::size_t batch,
                  std::vector<std::int64_t>& tokens) const {
        detail::resize_to(tokens, batch * info().tokens_per_image);
        tokenize(pixels, batch, span<std::int64_t>(tokens));
    }
    // Tokens back to pixels (tokenizers with a decoder only).
    void decode(span<const std::int64_t> tokens, std::size_t batch, span<float> pixels) const {
        check(beit_tokenizer_decode(get(), tokens.data(), tokens.size(), batch, pixels.data(),
                                    pixels.size()));
    }

    beit_tokenizer* get() const { return handle_.get(); }
    beit_tokenizer* raw() const noexcept { return handle_.raw(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }
    void reset() noexcept { handle_.reset(); }

private:
    friend class DvaeTrainer;  // hands out copies of the tokenizer it trains
    explicit Tokenizer(beit_tokenizer* raw) noexcept : handle_(raw, "Tokenizer") {}
    detail::Handle<beit_tokenizer, beit_tokenizer_free> handle_;
};

// What Dataset::read wrote besides the buffers.
struct SampleMeta {
    std::uint32_t label = 0;
    bool label_written = false;
    bool mask_written = false;
    bool tokens_written = false;
};

// beit_dataset: a .beitds file; immutable and thread-safe.
class Dataset {
public:
    Dataset() noexcept = default;

    static Dataset open(const std::string& path) {
        beit_dataset* raw = nullptr;
        check(beit_dataset_open(path.c_str(), &raw));
        return Dataset(raw);
    }

    DatasetInfo info() const {
        DatasetInfo info = beit_dataset_info_default();
        check(beit_dataset_get_info(get(), &info));
        return info;
    }
    std::uint64_t size() const { return info().count; }

    // Reads sample `index`: `pixels` must hold exactly info().pixels_len bytes; `mask` and
    // `tokens` are optional (empty: skipped) and, when given, exactly sized.
    SampleMeta read(std::uint64_t index, span<std::uint8_t> pixels,
                    span<std::uint8_t> mask = {}, span<std::uint16_t> tokens = {}) const {
        beit_dataset_sample s = beit_dataset_sample_default();
        s.pixels = pixels.data();
        s.pixels_len = pixels.size();
        s.mask = mask.empty() ? nullptr : mask.data();
        s.mask_len = mask.size();
        s.tokens = tokens.empty() ? nullptr : tokens.data();
        s.tokens_len = tokens.size();
        check(beit_dataset_read_sample(get(), index, &s));
        SampleMeta meta;
        meta.label = s.label;
        meta.label_written = s.label_written;
        meta.mask_written = s.mask_written;
        meta.tokens_written = s.tokens_written;
        return meta;
    }

    beit_dataset* get() const { return handle_.get(); }
    beit_dataset* raw() const noexcept { return handle_.raw(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }
    void reset() noexcept { handle_.reset(); }

private:
    explicit Dataset(beit_dataset* raw) noexcept : handle_(raw, "Dataset") {}
    detail::Handle<beit_dataset, beit_dataset_free> handle_;
};

// A masked-image-modeling batch for Trainer::step.
struct MimBatch {
    span<const float> pixels;  // [batch, C, H, W]
    std::size_t batch = 0;
    std::size_t channels = 0;
    std::size_t height = 0;
    std::size_t width = 0;
    span<const std::uint8_t> bool_masked_pos;  // [batch, num_patches], required
    span<const std::int64_t> labels;           // [batch, num_patches], required

    beit_mim_batch to_c() const {
        beit_mim_batch b = beit_mim_batch_default();
        b.pixels = pixels.data();
        b.pixels_len = pixels.size();
        b.batch = batch;
        b.channels = channels;
        b.height = height;
        b.width = width;
        b.bool_masked_pos = bool_masked_pos.data();
        b.bool_masked_pos_len = bool_masked_pos.size();
        b.labels = labels.data();
        b.labels_len = labels.size();
        return b;
    }
};

// beit_trainer: BEiT pretraining (AdamW). A trainer takes one call at a time: a call made while
// another thread's call on it runs throws BusyError and does nothing; serialise calls on a
// shared trainer (e.g. with a std::mutex).
class Trainer {
public:
    static TrainerOptions default_options() { return beit_trainer_options_default(); }

    Trainer() noexcept = default;

    // Trains a copy of `model`.
    static Trainer create(const Context& ctx, const Model& model,
                          const TrainerOptions& options = default_options()) {
        beit_trainer* raw = nullptr;
        check(beit_trainer_create(ctx.get(), model.get(), &options, &raw));
        return Trainer(raw);
    }
    static Trainer create_from_config(const Context& ctx, const std::string& config_json,
                                      std::uint64_t init_seed,
                                      const TrainerOptions& options = default_options()) {
        beit_trainer* raw = nullptr;
        check(beit_trainer_create_from_config(ctx.get(), config_json.c_str(), init_seed, &options,
                                              &raw));
        return Trainer(raw);
    }
    static Trainer load_model_dir(const Context& ctx, const std::string& dir,
                                  const TrainerOptions& options = default_options()) {
        beit_trainer* raw = nullptr;
        check(beit_trainer_load_model_dir(ctx.get(), dir.c_str(), &options, &raw));
        return Trainer(raw);
    }

    StepStats step(const MimBatch& batch) {
        const beit_mim_batch b = batch.to_c();
        StepStats stats = beit_step_stats_default();
        check(beit_trainer_step(get(), &b, &stats));
        return stats;
    }
    void save_checkpoint(const std::string& path) const {
        check(beit_trainer_save_checkpoint(get(), path.c_str()));
    }
    void load_checkpoint(const std::string& path) {
        check(beit_trainer_load_checkpoint(get(), path.c_str()));
    }
    void save_model(const std::string& dir) const {
        check(beit_trainer_save_model(get(), dir.c_str()));
    }
    std::uint64_t step_count() const {
        std::uint64_t n = 0;
        check(beit_trainer_step_count(get(), &n));
        return n;
    }
    std::uint64_t data_position() const {
        std::uint64_t n = 0;
        check(beit_trainer_get_data_position(get(), &n));
        return n;
    }
    void set_data_position(std::uint64_t position) {
        check(beit_trainer_set_data_position(get(), position));
    }
    ModelInfo model_info() const {
        ModelInfo info = beit_model_info_default();
        check(beit_trainer_get_model_info(get(), &info));
        return info;
    }

    beit_trainer* get() const { return handle_.get(); }
    beit_trainer* raw() const noexcept { return handle_.raw(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }
    void reset() noexcept { handle_.reset(); }

private:
    explicit Trainer(beit_trainer* raw) noexcept : handle_(raw, "Trainer") {}
    detail::Handle<beit_trainer, beit_trainer_free> handle_;
};

// ---------------------------------------------------------------------------------------------
// Tokenizer training (beit_dvae_trainer)

using DvaeConfig = beit_dvae_config;
using DvaeTrainOptions = beit_dvae_train_options;
using DvaeDataOptions = beit_dvae_data_options;
using DvaeStepStats = beit_dvae_step_stats;
using DvaeTrainSummary = beit_dvae_train_summary;

// Called after each step of DvaeTrainer::train; returning true stops the run there.
using DvaeProgress = std::function<bool(const DvaeStepStats&)>;

// DALL-E's pixel mapping 0.8 * x + 0.1 of images in [0, 1], in place: what DvaeTrainer::step
// takes (Tokenizer::tokenize maps by itself).
inline void map_pixels(span<float> pixels) noexcept {
    for (float& x : pixels) x = x * 0.8f + 0.1f;
}

// beit_dvae_trainer: trains a visual tokenizer (a dVAE with a decoder) on host batches (step) or
// on a dataset file with `beit tokenizer train`'s loop (train). On a cuda context the steps run
// on the GPU. A trainer takes one call at a time: a call made while another thread's call on it
// runs (or from inside a train() progress function) throws BusyError and does nothing.
class DvaeTrainer {
public:
    // `beit tokenizer train`'s defaults.
    static DvaeConfig default_config() { return beit_dvae_config_default(); }
    static DvaeTrainOptions default_options() { return beit_dvae_train_options_default(); }
    static DvaeDataOptions default_data_options() { return beit_dvae_data_options_default(); }

    DvaeTrainer() noexcept = default;

    // A new tokenizer of architecture `config`, initialised from options.seed.
    static DvaeTrainer create(const Context& ctx, const DvaeConfig& config = default_config(),
                              const DvaeTrainOptions& options = default_options()) {
        beit_dvae_trainer* raw = nullptr;
        check(beit_dvae_trainer_create(ctx.get(), &config, &options, &raw));
        return DvaeTrainer(raw);
    }
    // Goes on training the tokenizer directory `dir` (it needs a decoder) from step 0.
    static DvaeTrainer load(const Context& ctx, const std::string& dir,
                            const DvaeTrainOptions& options = default_options()) {
        beit_dvae_trainer* raw = nullptr;
        check(beit_dvae_trainer_load(ctx.get(), dir.c_str(), &options, &raw));
        return DvaeTrainer(raw);
    }

    TokenizerInfo info() const {
        TokenizerInfo info = beit_tokenizer_info_default();
        check(beit_dvae_trainer_get_info(get(), &info));
        return info;
    }
    std::uint64_t step_count() const {
        std::uint64_t n = 0;
        check(beit_dvae_trainer_step_count(get(), &n));
        return n;
    }

    // One step on `batch` images [batch, C, S, S] in the tokenizer's pixel mapping (map_pixels
    // of [0, 1] images).
    DvaeStepStats step(span<const float> mapped_pixels, std::size_t batch) {
        DvaeStepStats stats = beit_dvae_step_stats_default();
        check(beit_dvae_trainer_step(get(), mapped_pixels.data(), mapped_pixels.size(), batch,
                                     &stats));
        return stats;
    }

    // Trains on the images of the dataset file `dataset_path`. An exception thrown by
    // `progress` stops the run and is rethrown from here once the run has ended.
    DvaeTrainSummary train(const std::string& dataset_path,
                           const DvaeDataOptions& options = default_data_options(),
                           const DvaeProgress& progress = {}) {
        Progress state{&progress, nullptr};
        DvaeTrainSummary summary = beit_dvae_train_summary_default();
        const beit_status status =
            beit_dvae_trainer_train(get(), dataset_path.c_str(), &options,
                                    progress ? &DvaeTrainer::on_step : nullptr, &state, &summary);
        if (state.thrown) std::rethrow_exception(state.thrown);
        check(status);
        return summary;
    }

    // Writes the tokenizer directory (config.json + model.safetensors) Tokenizer::load reads;
    // a failed save leaves the files that were there.
    void save(const std::string& dir) const { check(beit_dvae_trainer_save(get(), dir.c_str())); }

    // A copy of the tokenizer as it stands now (later steps do not change it).
    Tokenizer tokenizer() const {
        beit_tokenizer* raw = nullptr;
        check(beit_dvae_trainer_get_tokenizer(get(), &raw));
        return Tokenizer(raw);
    }

    beit_dvae_trainer* get() const { return handle_.get(); }
    beit_dvae_trainer* raw() const noexcept { return handle_.raw(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }
    void reset() noexcept { handle_.reset(); }

private:
    struct Progress {
        const DvaeProgress* fn;
        std::exception_ptr thrown;
    };
    // No exception may cross the C library: it is kept, and the run stopped.
    static std::int32_t on_step(const DvaeStepStats* stats, void* user) noexcept {
        Progress* p = static_cast<Progress*>(user);
        try {
            return (*p->fn)(*stats) ? 1 : 0;
        } catch (...) {
            p->thrown = std::current_exception();
            return 1;
        }
    }

    explicit DvaeTrainer(beit_dvae_trainer* raw) noexcept : handle_(raw, "DvaeTrainer") {}
    detail::Handle<beit_dvae_trainer, beit_dvae_trainer_free> handle_;
};

}  // namespace beit

#endif  // BEIT_HPP

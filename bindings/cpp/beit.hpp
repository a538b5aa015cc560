// beit.hpp: a header-only C++17 wrapper of libbeit's C API (beit.h).
//
// - Handles (Context, Model, Trainer, Dataset, Tokenizer, DvaeTrainer) are move-only RAII
//   owners: the destructor calls the matching beit_*_free. Using a moved-from (empty) handle
//   throws beit::Error with status BEIT_ERR_NULL_POINTER; it never reaches the C library.
// - Every failing call throws beit::Error (or its subclass for the status: beit::IoError,
//   beit::BufferSizeError, ...), carrying status() and beit_last_error_message()'s text.
// - No tensor is copied: inputs are read through beit::span<const T>, outputs are written into
//   caller-owned memory (beit::span<T> or a std::vector the caller owns, resized to fit), or
//   into a beit::Tensor returned with its shape (Model::infer(ctx, images), Tokenizer::tokenize,
//   Dataset::read(index), ...).
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

// A C++ progress function run as a C callback of the long calls (DvaeTrainer::train,
// Trainer::finetune, Model::segmentation_finetune); `Stats` is the struct the callback gets.
// Its result passes through (true stops the run). No exception may cross the C library: one
// thrown by the function is kept and the run stopped; rethrow() raises it once the C call has
// returned.
template <class Stats>
class ProgressRelay {
public:
    using Function = std::function<bool(const Stats&)>;
    using Callback = std::int32_t (*)(const Stats*, void*);

    explicit ProgressRelay(const Function& fn) noexcept : fn_(fn) {}
    ProgressRelay(const ProgressRelay&) = delete;
    ProgressRelay& operator=(const ProgressRelay&) = delete;

    // The callback to pass, NULL without a function (the library then skips the calls).
    Callback callback() const noexcept { return fn_ ? &ProgressRelay::call : nullptr; }
    void* user_data() noexcept { return this; }
    // Raises the function's exception, if it threw one.
    void rethrow() const {
        if (thrown_) std::rethrow_exception(thrown_);
    }

private:
    static std::int32_t call(const Stats* stats, void* user) noexcept {
        ProgressRelay* self = static_cast<ProgressRelay*>(user);
        try {
            return self->fn_(*stats) ? 1 : 0;
        } catch (...) {
            self->thrown_ = std::current_exception();
            return 1;
        }
    }

    const Function& fn_;
    std::exception_ptr thrown_;
};
}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Tensors with their shapes

// A row-major (C order) array with its shape: data.size() is the product of shape. An empty
// tensor (no data, no shape) is an output that does not exist (or was not asked for).
template <class T>
struct BasicTensor {
    std::vector<T> data;
    std::vector<std::size_t> shape;

    std::size_t size() const noexcept { return data.size(); }
    bool empty() const noexcept { return shape.empty(); }
};
using Tensor = BasicTensor<float>;

namespace detail {
inline std::size_t numel(const std::vector<std::size_t>& shape) {
    std::size_t n = 1;
    for (std::size_t d : shape) n *= d;
    return n;
}

inline std::string shape_text(const std::vector<std::size_t>& shape) {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

// `shape` when it holds exactly `n` values, the length libbeit reported for that output; a
// difference means the wrapper derived the layout wrongly, and throws InternalError rather
// than hand out a mislabelled tensor.
inline std::vector<std::size_t> checked_shape(const char* what, std::size_t n,
                                              std::vector<std::size_t> shape) {
    if (numel(shape) != n) {
        throw_error(BEIT_ERR_INTERNAL, std::string(what) + ": shape " + shape_text(shape) +
                                           " holds " + std::to_string(numel(shape)) +
                                           " values, but libbeit reports " + std::to_string(n));
    }
    return shape;
}

// A zeroed parameter of `shape`; an empty shape is a 0-d parameter (one value, e.g. a
// BatchNorm's num_batches_tracked).
inline BasicTensor<float> parameter_tensor(std::vector<std::size_t> shape) {
    BasicTensor<float> t;
    t.data.assign(numel(shape), 0.0f);
    t.shape = std::move(shape);
    return t;
}

// A zeroed tensor of `shape`; an empty shape (no such output) gives an empty tensor.
template <class T>
BasicTensor<T> tensor_of(std::vector<std::size_t> shape) {
    BasicTensor<T> t;
    if (!shape.empty()) {
        t.data.assign(numel(shape), T());
        t.shape = std::move(shape);
    }
    return t;
}
}  // namespace detail

// ---------------------------------------------------------------------------------------------
// The device

// The name the CLI's --device takes: "auto", "cpu" or "cuda" ("unknown" otherwise).
inline const char* device_name(beit_device device) noexcept {
    switch (device) {
    case BEIT_DEVICE_AUTO: return "auto";
    case BEIT_DEVICE_CPU: return "cpu";
    case BEIT_DEVICE_CUDA: return "cuda";
    default: return "unknown";
    }
}

// What BEIT_DEVICE_AUTO picks on this machine and the CUDA probe's findings (beit_device_info).
struct DeviceInfo {
    beit_device kind = BEIT_DEVICE_CPU;  // BEIT_DEVICE_CUDA when the probe found a usable GPU
    bool cuda_usable = false;
    std::string name;  // the GPU's name (device 0), or "cpu"
    int compute_capability_major = 0;  // 9 and 0 for an H100/H200; 0 without a GPU
    int compute_capability_minor = 0;
    std::uint64_t total_memory = 0;  // GPU memory in bytes; 0 without a GPU
    int driver_version = 0;          // the driver's CUDA version, 1000*major + 10*minor; 0: none
    int device_count = 0;            // CUDA devices the driver sees
    std::string reason;  // the probe's sentence: the GPU found, or exactly what is missing
};

// Probes CUDA on the first call of the process (a missing driver or GPU is reported in
// `reason`, not thrown); later calls give the same report.
inline DeviceInfo device_info() {
    beit_device_info c = beit_device_info_default();
    check(beit_get_device_info(&c));
    DeviceInfo info;
    info.kind = c.kind;
    info.cuda_usable = c.cuda_usable != 0;
    info.name = c.name;
    info.compute_capability_major = c.compute_capability_major;
    info.compute_capability_minor = c.compute_capability_minor;
    info.total_memory = c.total_memory;
    info.driver_version = c.driver_version;
    info.device_count = c.device_count;
    info.reason = c.reason;
    return info;
}

using ContextOptions = beit_context_options;
using ModelInfo = beit_model_info;
using OutputSizes = beit_output_sizes;
using TokenizerInfo = beit_tokenizer_info;
using DatasetInfo = beit_dataset_info;
using TrainerOptions = beit_trainer_options;
using StepStats = beit_step_stats;
using PassStats = beit_pass_stats;  // what Trainer::forward_backward computed

// The name of a precision (TrainerOptions::precision): "default", "fp32" or "bf16"
// ("unknown" otherwise).
inline const char* precision_name(beit_precision precision) noexcept {
    switch (precision) {
    case BEIT_PRECISION_DEFAULT: return "default";
    case BEIT_PRECISION_FP32: return "fp32";
    case BEIT_PRECISION_BF16: return "bf16";
    default: return "unknown";
    }
}

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
    // A context on GPU `device_index` (ContextOptions::device_index: as the driver numbers them,
    // after CUDA_VISIBLE_DEVICES). Throws UnsupportedError without a usable GPU of that index,
    // or when this process already drives another GPU (one process per GPU).
    static Context cuda(std::uint32_t device_index = 0, std::uint32_t num_threads = 0,
                        std::uint64_t memory_budget = 0) {
        ContextOptions o = default_options();
        o.device = BEIT_DEVICE_CUDA;
        o.device_index = device_index;
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

// The shapes of Model::infer's outputs for one input size; an empty shape is an output the
// model does not have.
struct OutputShapes {
    std::vector<std::size_t> last_hidden_state;  // [batch, num_tokens, hidden_size]
    std::vector<std::size_t> pooler_output;      // [batch, hidden_size]
    // [batch, num_patches, vocab_size] (masked image modeling), [batch, num_labels]
    // (classification) or [batch, num_labels, 4·gh, 4·gw] (segmentation, a gh x gw patch grid)
    std::vector<std::size_t> logits;
};

// Every output of one Model::infer, each with its shape; an empty Tensor is an output the model
// does not have.
struct InferResult {
    Tensor last_hidden_state;
    Tensor pooler_output;
    Tensor logits;
};

// One parameter of a model or trainer (beit_parameter_info), by its Hugging Face name.
struct ParameterInfo {
    std::string name;                // as in model.safetensors
    std::vector<std::size_t> shape;  // outermost first
    std::size_t numel = 0;           // the product of shape
    std::size_t offset = 0;          // where it starts in the flat buffer the gradients share

    // This parameter's part of `flat`, a buffer laid out like the parameters (e.g. a
    // Trainer's Gradients): a view, writes go through. Throws BufferSizeError when `flat` is
    // too short to hold it.
    template <class T>
    span<T> of(span<T> flat) const {
        if (flat.size() < offset || flat.size() - offset < numel) {
            throw_error(BEIT_ERR_BUFFER_SIZE, name + " spans [" + std::to_string(offset) + ", " +
                                                  std::to_string(offset + numel) +
                                                  "), past a buffer of " + std::to_string(flat.size()));
        }
        return flat.subspan(offset, numel);
    }
};

namespace detail {
// The parameters a handle lists through its count and info calls, in layout order.
template <class Count, class Info>
std::vector<ParameterInfo> list_parameters(Count count, Info info) {
    std::size_t n = 0;
    check(count(&n));
    std::vector<ParameterInfo> out;
    out.reserve(n);
    for (std::size_t i = 0; i < n; i++) {
        beit_parameter_info c = beit_parameter_info_default();
        check(info(i, &c));
        ParameterInfo p;
        p.name = c.name;
        p.shape.assign(c.shape, c.shape + c.ndim);
        p.numel = c.numel;
        p.offset = c.offset;
        out.push_back(std::move(p));
    }
    return out;
}

// The shape of parameter `name` among `all`; InvalidArgumentError when there is none.
inline std::vector<std::size_t> parameter_shape(const std::vector<ParameterInfo>& all,
                                                const std::string& name) {
    for (const ParameterInfo& p : all) {
        if (p.name == name) return p.shape;
    }
    throw_error(BEIT_ERR_INVALID_ARGUMENT,
                "no parameter is named \"" + name + "\" (parameters() lists them" +
                    (all.empty() ? std::string(")") : ": \"" + all.front().name + "\", ...)"));
}
}  // namespace detail

// Declared here for Model's and Trainer's fine-tuning methods; defined, with those methods, in
// the section "Fine-tuning, evaluation and segmentation" at the end of this file.
using FinetuneOptions = beit_finetune_options;
using SegmentationOptions = beit_segmentation_options;
using SegmentationReport = beit_segmentation_report;
using SegmentationEvalOptions = beit_segmentation_eval_options;
using SegmentationStep = beit_segmentation_step;
// Called after each step of Trainer::finetune / Model::segmentation_finetune; returning true
// stops the run there. An exception it throws stops the run and is rethrown from the call.
using StepProgress = std::function<bool(const StepStats&)>;
using SegmentationProgress = std::function<bool(const SegmentationStep&)>;
struct ClassifyBatch;
struct SegBatch;
struct Evaluation;
struct SegmentationEvaluation;
struct SegmentationResult;

// beit_model: many threads may infer with one model at once. set_parameter and
// copy_parameters_from change it; they never wait: while another thread's call uses the
// model they throw BusyError and change nothing.
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
    // The shapes of the outputs for `batch` images of height x width pixels (the C API gives
    // lengths; the layouts follow from the model's info and are checked against them).
    OutputShapes output_shapes(std::size_t batch, std::size_t height, std::size_t width) const {
        const OutputSizes sizes = output_sizes(batch, height, width);
        const ModelInfo i = info();
        OutputShapes shapes;
        if (sizes.last_hidden_state_len) {
            shapes.last_hidden_state = detail::checked_shape(
                "last_hidden_state", sizes.last_hidden_state_len, {batch, sizes.num_tokens, i.hidden_size});
        }
        if (sizes.pooler_output_len) {
            shapes.pooler_output =
                detail::checked_shape("pooler_output", sizes.pooler_output_len, {batch, i.hidden_size});
        }
        if (sizes.logits_len) {
            std::vector<std::size_t> shape;
            switch (i.architecture) {
            case BEIT_ARCH_MASKED_IMAGE_MODELING:
                shape = {batch, sizes.num_patches, i.vocab_size};
                break;
            case BEIT_ARCH_SEMANTIC_SEGMENTATION:  // the decode head's logits at 4x the patch grid
                shape = {batch, i.num_labels, 4 * (height / i.patch_height), 4 * (width / i.patch_width)};
                break;
            default:
                shape = {batch, i.num_labels};
            }
            shapes.logits = detail::checked_shape("logits", sizes.logits_len, std::move(shape));
        }
        return shapes;
    }

    // Runs the model, writing into the caller's buffers (each must be empty or exactly sized:
    // see output_sizes; a wrong size throws beit::BufferSizeError, writing nothing).
    void infer(const Context& ctx, const Images& input, const Outputs& outputs) const {
        const beit_image_batch in = input.to_c();
        const beit_infer_outputs out = outputs.to_c();
        check(beit_model_infer(ctx.get(), get(), &in, &out));
    }
    // Runs the model and returns every output it has, each a Tensor with its shape (see
    // output_shapes), written by the library in place.
    InferResult infer(const Context& ctx, const Images& input) const {
        (void)ctx.get();  // an empty context throws before anything else is checked
        const OutputShapes shapes = output_shapes(input.batch, input.height, input.width);
        InferResult r;
        r.last_hidden_state = detail::tensor_of<float>(shapes.last_hidden_state);
        r.pooler_output = detail::tensor_of<float>(shapes.pooler_output);
        r.logits = detail::tensor_of<float>(shapes.logits);
        Outputs out;
        out.last_hidden_state = r.last_hidden_state.data;
        out.pooler_output = r.pooler_output.data;
        out.logits = r.logits.data;
        infer(ctx, input, out);
        return r;
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

    // Parameters by Hugging Face name (as in model.safetensors), in layout order.
    std::vector<ParameterInfo> parameters() const {
        beit_model* m = get();
        return detail::list_parameters(
            [m](std::size_t* n) { return beit_model_parameter_count(m, n); },
            [m](std::size_t i, beit_parameter_info* out) { return beit_model_parameter_info(m, i, out); });
    }
    // Copies parameter `name` into `out`, exactly its size (else BufferSizeError).
    void get_parameter(const std::string& name, span<float> out) const {
        check(beit_model_get_parameter(get(), name.c_str(), out.data(), out.size()));
    }
    // Parameter `name` with its shape.
    Tensor parameter(const std::string& name) const {
        Tensor t = detail::parameter_tensor(detail::parameter_shape(parameters(), name));
        get_parameter(name, span<float>(t.data));
        return t;
    }
    // Sets parameter `name` from `values` (exactly its size, all finite; else
    // InvalidArgumentError); BusyError while another thread infers. On error nothing changes.
    void set_parameter(const std::string& name, span<const float> values) {
        check(beit_model_set_parameter(get(), name.c_str(), values.data(), values.size()));
    }
    // Sets every parameter from `src` (the same names and shapes). On error nothing changes.
    void copy_parameters_from(const Model& src) {
        check(beit_model_copy_parameters(get(), src.get()));
    }

    // Fine-tuning and evaluation: each returns a new Model (this one is only read). Defined in
    // the section "Fine-tuning, evaluation and segmentation" below, which documents them.
    Model to_classifier(const Context& ctx, std::size_t num_labels, double drop_path_rate = 0.1,
                        std::uint64_t seed = 0) const;
    static Model create_classifier(const Context& ctx, const std::string& config_json,
                                   std::size_t num_labels, double drop_path_rate = 0.1,
                                   std::uint64_t seed = 0);
    Model with_image_size(const Context& ctx, std::size_t height, std::size_t width) const;
    Evaluation evaluate(const Context& ctx, const std::string& dataset_path,
                        std::size_t batch_size = 256) const;
    Model to_segmenter(const Context& ctx, std::size_t num_labels, std::uint64_t seed = 0) const;
    static Model create_segmenter(const Context& ctx, const std::string& config_json,
                                  std::size_t num_labels, std::uint64_t seed = 0);
    SegmentationResult segmentation_finetune(
        const Context& ctx, const std::string& dataset_path,
        const SegmentationOptions& options = beit_segmentation_options_default(),
        const SegmentationProgress& progress = {}) const;
    SegmentationEvaluation evaluate_segmentation(
        const Context& ctx, const std::string& dataset_path,
        const SegmentationEvalOptions& options = beit_segmentation_eval_options_default()) const;

    beit_model* get() const { return handle_.get(); }
    beit_model* raw() const noexcept { return handle_.raw(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }
    void reset() noexcept { handle_.reset(); }

private:
    friend class Trainer;  // Trainer::model() hands out a new Model
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
    // The same, returning the tokens with their shape [batch, tokens_per_image].
    BasicTensor<std::int64_t> tokenize(span<const float> pixels, std::size_t batch) const {
        BasicTensor<std::int64_t> tokens =
            detail::tensor_of<std::int64_t>({batch, info().tokens_per_image});
        tokenize(pixels, batch, span<std::int64_t>(tokens.data));
        return tokens;
    }
    // Tokens back to pixels (tokenizers with a decoder only).
    void decode(span<const std::int64_t> tokens, std::size_t batch, span<float> pixels) const {
        check(beit_tokenizer_decode(get(), tokens.data(), tokens.size(), batch, pixels.data(),
                                    pixels.size()));
    }
    // The same, returning the images with their shape [batch, C, S, S].
    Tensor decode(span<const std::int64_t> tokens, std::size_t batch) const {
        const TokenizerInfo i = info();
        Tensor pixels = detail::tensor_of<float>({batch, i.in_channels, i.image_size, i.image_size});
        decode(tokens, batch, span<float>(pixels.data));
        return pixels;
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

// One sample of Dataset::read(index), each array with its shape: pixels [H, W, C] (channels
// interleaved), mask [H, W] and tokens [token_grid_h, token_grid_w] (empty tensors when the
// dataset has none).
struct Sample {
    BasicTensor<std::uint8_t> pixels;
    BasicTensor<std::uint8_t> mask;
    BasicTensor<std::uint16_t> tokens;
    SampleMeta meta;
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
    // Reads sample `index` into new tensors, with its mask and tokens when the dataset has them.
    Sample read(std::uint64_t index) const {
        const DatasetInfo i = info();
        Sample s;
        s.pixels = detail::tensor_of<std::uint8_t>(
            detail::checked_shape("pixels", i.pixels_len, {i.height, i.width, i.channels}));
        if (i.has_masks) {
            s.mask = detail::tensor_of<std::uint8_t>(
                detail::checked_shape("mask", i.mask_len, {i.height, i.width}));
        }
        if (i.has_tokens) {
            s.tokens = detail::tensor_of<std::uint16_t>(
                detail::checked_shape("tokens", i.tokens_len, {i.token_grid_h, i.token_grid_w}));
        }
        s.meta = read(index, s.pixels.data, s.mask.data, s.tokens.data);
        return s;
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

// The pending step's gradient buffer (Trainer::gradients(), beit_gradients): size() floats laid
// out like the parameters (ParameterInfo::offset; ParameterInfo::of(gradients.host()) is one
// parameter's part). On a CPU context it is host memory the trainer owns, read and written in
// place through data(), begin()/end(), operator[] or host() (an all-reduce, clipping of your
// own): apply_gradients() uses it as left. It holds the step's gradients until
// apply_gradients() or discard_gradients(), and must not be used once the Trainer is gone. On a
// cuda context on_host() is false, data() is null (host() throws UnsupportedError), and
// device_pointer() (a CUdeviceptr) and stream() (the CUstream the backward pass was queued
// on: finish or queue your work on it before apply_gradients()) give the buffer.
class Gradients {
public:
    explicit Gradients(const beit_gradients& c) noexcept : c_(c) {}

    beit_memory_location location() const noexcept { return c_.location; }
    bool on_host() const noexcept { return c_.location == BEIT_MEMORY_HOST; }
    std::size_t size() const noexcept { return c_.len; }
    float* data() const noexcept { return c_.host; }
    float* begin() const noexcept { return c_.host; }
    float* end() const noexcept { return c_.host ? c_.host + c_.len : nullptr; }
    float& operator[](std::size_t i) const noexcept { return c_.host[i]; }
    // The host buffer as a span; UnsupportedError for a buffer on the GPU.
    span<float> host() const {
        if (!on_host()) {
            throw_error(BEIT_ERR_UNSUPPORTED,
                        "the gradients are in CUDA device memory: use device_pointer() and stream()");
        }
        return {c_.host, c_.len};
    }
    std::uint64_t device_pointer() const noexcept { return c_.device_pointer; }
    void* stream() const noexcept { return c_.stream; }
    const beit_gradients& c() const noexcept { return c_; }

private:
    beit_gradients c_;
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

    // The split step, for hosts that work on the gradients before the optimizer
    // (data-parallel training's all-reduce, their own clipping): forward_backward() checks the
    // batch as step() does, runs the forward and backward and leaves the step pending;
    // gradients() shows the buffer; apply_gradients() finishes the step (clipping + AdamW) or
    // discard_gradients() drops it (the trainer as before, random state included).
    // forward_backward() + apply_gradients() equals step() bit for bit. While a step is
    // pending, step(), forward_backward(), checkpoints and set_parameter() throw
    // InvalidArgumentError.
    PassStats forward_backward(const MimBatch& batch) {
        const beit_mim_batch b = batch.to_c();
        PassStats stats = beit_pass_stats_default();
        check(beit_trainer_forward_backward(get(), &b, &stats));
        return stats;
    }
    // The pending step's gradient buffer (see Gradients); InvalidArgumentError when none is
    // pending.
    Gradients gradients() {
        beit_gradients g = beit_gradients_default();
        check(beit_trainer_get_gradients(get(), &g));
        return Gradients(g);
    }
    // NumericalError when the gradient norm is not finite: the step is dropped.
    StepStats apply_gradients() {
        StepStats stats = beit_step_stats_default();
        check(beit_trainer_apply_gradients(get(), &stats));
        return stats;
    }
    void discard_gradients() { check(beit_trainer_discard_gradients(get())); }

    // Parameters by Hugging Face name, as Model's; offset also places each in gradients().
    std::vector<ParameterInfo> parameters() const {
        beit_trainer* t = get();
        return detail::list_parameters(
            [t](std::size_t* n) { return beit_trainer_parameter_count(t, n); },
            [t](std::size_t i, beit_parameter_info* out) { return beit_trainer_parameter_info(t, i, out); });
    }
    void get_parameter(const std::string& name, span<float> out) const {
        check(beit_trainer_get_parameter(get(), name.c_str(), out.data(), out.size()));
    }
    // Parameter `name` with its shape, as of the last applied step.
    Tensor parameter(const std::string& name) const {
        Tensor t = detail::parameter_tensor(detail::parameter_shape(parameters(), name));
        get_parameter(name, span<float>(t.data));
        return t;
    }
    // The next step trains from the new values; the optimizer state is kept.
    void set_parameter(const std::string& name, span<const float> values) {
        check(beit_trainer_set_parameter(get(), name.c_str(), values.data(), values.size()));
    }
    void copy_parameters_from(const Model& model) {
        check(beit_trainer_copy_parameters_from(get(), model.get()));
    }
    // A new Model holding a copy of the trainer's model as of its last applied step (it does
    // not follow later steps).
    Model model() const {
        beit_model* raw = nullptr;
        check(beit_trainer_get_model(get(), &raw));
        return Model(raw);
    }

    // Fine-tuning a classification trainer (made from a BeitForImageClassification): defined
    // in the section "Fine-tuning, evaluation and segmentation" below, which documents them.
    StepStats step_classify(const ClassifyBatch& batch, float label_smoothing = 0.1f);
    // Segmentation trainers (made from a BeitForSemanticSegmentation): one step on a batch of
    // images and per-pixel labels, then the BatchNorm running statistics' update (the step
    // Model::segmentation_finetune takes); forward_backward_segment is its first half
    // (apply_gradients finishes it, and only then updates the running statistics).
    StepStats step_segment(const SegBatch& batch);
    PassStats forward_backward_segment(const SegBatch& batch);
    void finetune(const std::string& dataset_path,
                  const FinetuneOptions& options = beit_finetune_options_default(),
                  const StepProgress& progress = {});

    beit_trainer* get() const { return handle_.get(); }
    beit_trainer* raw() const noexcept { return handle_.raw(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }
    void reset() noexcept { handle_.reset(); }

private:
    explicit Trainer(beit_trainer* raw) noexcept : handle_(raw, "Trainer") {}
    detail::Handle<beit_trainer, beit_trainer_free> handle_;
};

// =============================================================================================
// Data: writing and importing datasets, the augmenting loader, the mask generator
// (beit_dataset_writer_*, beit_dataset_import, beit_loader_*, beit_mask_generator_*).
// DatasetWriter, Loader and MaskGenerator are move-only RAII owners like the handles above.

using DatasetSpec = beit_dataset_spec;
using ImportOptions = beit_dataset_import_options;
using LoaderOptions = beit_loader_options;
using LoaderInfo = beit_loader_info;
using MaskGeneratorOptions = beit_mask_generator_options;

// `count` samples back to back for DatasetWriter::append: pixels u8 [count, H, W, C] (each
// pixel's channels together), labels [count], masks [count, H, W], tokens
// [count, token_grid_h, token_grid_w]; an optional part is given (non-empty) exactly when the
// spec has it.
struct Samples {
    std::size_t count = 0;
    span<const std::uint8_t> pixels;
    span<const std::uint32_t> labels;
    span<const std::uint8_t> masks;
    span<const std::uint16_t> tokens;

    beit_dataset_samples to_c() const {
        beit_dataset_samples s = beit_dataset_samples_default();
        s.count = count;
        s.pixels = pixels.data();
        s.pixels_len = pixels.size();
        s.labels = labels.empty() ? nullptr : labels.data();
        s.labels_len = labels.size();
        s.masks = masks.empty() ? nullptr : masks.data();
        s.masks_len = masks.size();
        s.tokens = tokens.empty() ? nullptr : tokens.data();
        s.tokens_len = tokens.size();
        return s;
    }
};

// beit_dataset_writer: writes a .beitds file atomically. Nothing exists at the path until
// finish(); destroying an unfinished writer abandons it and leaves nothing behind. One call at a
// time (a concurrent call throws BusyError).
class DatasetWriter {
public:
    static DatasetSpec default_spec() { return beit_dataset_spec_default(); }

    DatasetWriter() noexcept = default;

    static DatasetWriter create(const std::string& path, const DatasetSpec& spec) {
        beit_dataset_writer* raw = nullptr;
        check(beit_dataset_writer_create(path.c_str(), &spec, &raw));
        return DatasetWriter(raw);
    }
    // Appends samples.count samples; all or nothing.
    void append(const Samples& samples) {
        const beit_dataset_samples s = samples.to_c();
        check(beit_dataset_writer_append(get(), &s));
    }
    // Samples appended so far.
    std::uint64_t count() const {
        std::uint64_t n = 0;
        check(beit_dataset_writer_count(get(), &n));
        return n;
    }
    // Writes the file and describes it; the writer takes nothing more afterwards.
    DatasetInfo finish() {
        DatasetInfo info = beit_dataset_info_default();
        check(beit_dataset_writer_finish(get(), &info));
        return info;
    }

    beit_dataset_writer* get() const { return handle_.get(); }
    beit_dataset_writer* raw() const noexcept { return handle_.raw(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }
    void reset() noexcept { handle_.reset(); }

private:
    explicit DatasetWriter(beit_dataset_writer* raw) noexcept : handle_(raw, "DatasetWriter") {}
    detail::Handle<beit_dataset_writer, beit_dataset_writer_free> handle_;
};

inline ImportOptions default_import_options() { return beit_dataset_import_options_default(); }

// Converts images (and labels) into a dataset file, as `beit dataset import` does (see
// beit_import_format); returns what the file holds.
inline DatasetInfo import_dataset(const ImportOptions& options) {
    DatasetInfo info = beit_dataset_info_default();
    check(beit_dataset_import(&options, &info));
    return info;
}

// One loader batch in vectors the caller owns (Loader::next resizes them, reusing their
// storage): view1 f32 [images, channels, height, width], view2 f32
// [images, channels, view2_height, view2_width], bool_masked_pos u8 [images, num_patches],
// labels i64 [images] (empty without labels), tokens i64 [images, num_patches] (empty without a
// token source).
struct LoaderBatch {
    std::vector<float> view1;
    std::vector<float> view2;
    std::vector<std::uint8_t> bool_masked_pos;
    std::vector<std::int64_t> labels;
    std::vector<std::int64_t> tokens;
    std::size_t images = 0;
    std::size_t channels = 0;
    std::size_t height = 0;
    std::size_t width = 0;
    std::size_t view2_height = 0;
    std::size_t view2_width = 0;
    std::size_t num_patches = 0;
    std::uint64_t position = 0;
    std::uint64_t epoch = 0;

    std::array<std::size_t, 4> view1_shape() const { return {images, channels, height, width}; }
    std::array<std::size_t, 4> view2_shape() const { return {images, channels, view2_height, view2_width}; }
    std::array<std::size_t, 2> mask_shape() const { return {images, num_patches}; }
    // The batch as Trainer::step takes it: view 1, the masks, the tokens as labels (valid
    // while the batch lives).
    MimBatch mim_batch() const {
        MimBatch b;
        b.pixels = span<const float>(view1);
        b.batch = images;
        b.channels = channels;
        b.height = height;
        b.width = width;
        b.bool_masked_pos = span<const std::uint8_t>(bool_masked_pos);
        b.labels = span<const std::int64_t>(tokens);
        return b;
    }
};

// beit_loader: BEiT's augmenting pretraining loader over a dataset file, an endless sequence
// of batches addressed by a global position (seek() resumes a run exactly). The defaults are
// `beit pretrain`'s recipe; set `model` (or the image and patch sizes) and usually
// `batch_size`, `seed` and the token source. One call at a time (info() excepted).
class Loader {
public:
    static LoaderOptions default_options() { return beit_loader_options_default(); }

    Loader() noexcept = default;

    static Loader create(const Context& ctx, const std::string& dataset_path,
                         const LoaderOptions& options) {
        beit_loader* raw = nullptr;
        check(beit_loader_create(ctx.get(), dataset_path.c_str(), &options, &raw));
        return Loader(raw);
    }

    LoaderInfo info() const {
        LoaderInfo info = beit_loader_info_default();
        check(beit_loader_get_info(get(), &info));
        return info;
    }
    // The batch at the current position, into `batch`; the position moves on by one.
    void next(LoaderBatch& batch) {
        const LoaderInfo i = info();
        detail::resize_to(batch.view1, i.view1_len);
        detail::resize_to(batch.view2, i.view2_len);
        detail::resize_to(batch.bool_masked_pos, i.bool_masked_pos_len);
        detail::resize_to(batch.labels, i.labels_len);
        detail::resize_to(batch.tokens, i.tokens_len);
        beit_loader_batch b = beit_loader_batch_default();
        b.view1 = batch.view1.data();
        b.view1_len = batch.view1.size();
        b.view2 = batch.view2.data();
        b.view2_len = batch.view2.size();
        b.bool_masked_pos = batch.bool_masked_pos.data();
        b.bool_masked_pos_len = batch.bool_masked_pos.size();
        b.labels = batch.labels.empty() ? nullptr : batch.labels.data();
        b.labels_len = batch.labels.size();
        b.tokens = batch.tokens.empty() ? nullptr : batch.tokens.data();
        b.tokens_len = batch.tokens.size();
        check(beit_loader_next(get(), &b));
        const std::size_t n = b.images;
        batch.images = n;
        batch.channels = i.channels;
        batch.height = i.height;
        batch.width = i.width;
        batch.view2_height = i.view2_height;
        batch.view2_width = i.view2_width;
        batch.num_patches = i.num_patches;
        batch.position = b.position;
        batch.epoch = b.epoch;
        if (n < i.batch_size) {  // the short last batch of an epoch
            batch.view1.resize(n * i.channels * i.height * i.width);
            batch.view2.resize(n * i.channels * i.view2_height * i.view2_width);
            batch.bool_masked_pos.resize(n * i.num_patches);
            if (!batch.labels.empty()) batch.labels.resize(n);
            if (!batch.tokens.empty()) batch.tokens.resize(n * i.num_patches);
        }
    }
    LoaderBatch next() {
        LoaderBatch batch;
        next(batch);
        return batch;
    }
    std::uint64_t position() const {
        std::uint64_t p = 0;
        check(beit_loader_get_position(get(), &p));
        return p;
    }
    // Makes the batch at `position` the next one (e.g. Trainer::data_position()).
    void seek(std::uint64_t position) { check(beit_loader_seek(get(), position)); }

    beit_loader* get() const { return handle_.get(); }
    beit_loader* raw() const noexcept { return handle_.raw(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }
    void reset() noexcept { handle_.reset(); }

private:
    explicit Loader(beit_loader* raw) noexcept : handle_(raw, "Loader") {}
    detail::Handle<beit_loader, beit_loader_free> handle_;
};

// beit_mask_generator: BEiT's block-wise (or random) masks, seeded. One call at a time.
class MaskGenerator {
public:
    static MaskGeneratorOptions default_options() { return beit_mask_generator_options_default(); }

    MaskGenerator() noexcept = default;

    static MaskGenerator create(const MaskGeneratorOptions& options) {
        beit_mask_generator* raw = nullptr;
        check(beit_mask_generator_create(&options, &raw));
        return MaskGenerator(raw, options.grid_height * options.grid_width);
    }
    // Draws a mask into `mask` (exactly grid_height * grid_width bytes, row-major, 1 = masked);
    // returns the masked count.
    std::size_t next(span<std::uint8_t> mask) {
        std::size_t masked = 0;
        check(beit_mask_generator_next(get(), mask.data(), mask.size(), &masked));
        return masked;
    }
    // The same, resizing `mask` to the grid.
    std::size_t next(std::vector<std::uint8_t>& mask) {
        detail::resize_to(mask, patches_);
        return next(span<std::uint8_t>(mask));
    }

    beit_mask_generator* get() const { return handle_.get(); }
    beit_mask_generator* raw() const noexcept { return handle_.raw(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }
    void reset() noexcept { handle_.reset(); }

private:
    MaskGenerator(beit_mask_generator* raw, std::size_t patches) noexcept
        : handle_(raw, "MaskGenerator"), patches_(patches) {}
    detail::Handle<beit_mask_generator, beit_mask_generator_free> handle_;
    std::size_t patches_ = 0;
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
        detail::ProgressRelay<DvaeStepStats> relay(progress);
        DvaeTrainSummary summary = beit_dvae_train_summary_default();
        const beit_status status = beit_dvae_trainer_train(get(), dataset_path.c_str(), &options,
                                                           relay.callback(), relay.user_data(), &summary);
        relay.rethrow();
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
    explicit DvaeTrainer(beit_dvae_trainer* raw) noexcept : handle_(raw, "DvaeTrainer") {}
    detail::Handle<beit_dvae_trainer, beit_dvae_trainer_free> handle_;
};

// =============================================================================================
// Fine-tuning, evaluation and segmentation (beit_trainer_options_finetune_default,
// beit_finetune_options_default, beit_classify_batch_default, beit_evaluation_default,
// beit_model_to_classifier, beit_classifier_create, beit_model_with_image_size,
// beit_trainer_step_classify, beit_trainer_finetune, beit_finetune_epoch_steps,
// beit_model_evaluate, beit_segmentation_*_default, beit_model_to_segmenter,
// beit_segmenter_create, beit_segmentation_finetune, beit_model_evaluate_segmentation).
// The option structs are the C ones (aliases declared above Model); the results carry their
// shapes. As everywhere, on an error nothing is written and the exception of the status is
// thrown.

// `beit finetune`'s trainer options for a run of `total_steps` steps (lr 1e-3 after a linear
// warmup of a tenth of the run, cosine to 1e-6, AdamW betas (0.9, 0.999), weight decay 0.05,
// no clipping, drop path 0.1, layer decay 0.65, seed 0); 0 steps: a constant rate.
inline TrainerOptions finetune_trainer_options(std::uint64_t total_steps) {
    return beit_trainer_options_finetune_default(total_steps);
}
// `beit finetune`'s data options for Trainer::finetune (batch 64, label smoothing 0.1, ...).
inline FinetuneOptions default_finetune_options() { return beit_finetune_options_default(); }
// `beit segment finetune`'s options (BEiT's segmentation recipe scaled to small runs).
inline SegmentationOptions default_segmentation_options() {
    return beit_segmentation_options_default();
}
// `beit segment eval`'s options: the test split of the default split, batches of 32.
inline SegmentationEvalOptions default_segmentation_eval_options() {
    return beit_segmentation_eval_options_default();
}

// The name `beit segment eval --split-name` takes for a split: "all" or "test" ("unknown"
// otherwise).
inline const char* split_name(beit_split split) noexcept {
    switch (split) {
    case BEIT_SPLIT_ALL: return "all";
    case BEIT_SPLIT_TEST: return "test";
    default: return "unknown";
    }
}

// The optimizer steps of one epoch of Trainer::finetune over the dataset file at
// `dataset_path` with `batch_size` images per step and the labelled fraction `label_fraction`
// drawn by `seed` (as FinetuneOptions draws it): epochs x this is `beit finetune --epochs`'
// step count, for finetune_trainer_options.
inline std::uint64_t finetune_epoch_steps(const std::string& dataset_path, std::size_t batch_size,
                                          double label_fraction = 1.0, std::uint64_t seed = 0) {
    std::uint64_t steps = 0;
    check(beit_finetune_epoch_steps(dataset_path.c_str(), batch_size, label_fraction, seed, &steps));
    return steps;
}

// A labelled batch for Trainer::step_classify: NCHW f32 pixels normalised as the model
// expects, at its configured size, and one label in [0, num_labels) per image.
struct ClassifyBatch {
    span<const float> pixels;  // [batch, C, H, W]
    std::size_t batch = 0;
    std::size_t channels = 0;
    std::size_t height = 0;
    std::size_t width = 0;
    span<const std::int64_t> labels;  // [batch]

    beit_classify_batch to_c() const {
        beit_classify_batch b = beit_classify_batch_default();
        b.pixels = pixels.data();
        b.pixels_len = pixels.size();
        b.batch = batch;
        b.channels = channels;
        b.height = height;
        b.width = width;
        b.labels = labels.data();
        b.labels_len = labels.size();
        return b;
    }
};

// A segmentation trainer's batch: pixels [batch, C, H, W] at the model's image size (batch >=
// 2: BatchNorm trains on the batch's statistics), labels [batch, H, W], one class id per pixel
// in [0, num_labels) or the config's semantic_loss_ignore_index (255 by default: not scored).
struct SegBatch {
    span<const float> pixels;
    std::size_t batch = 0;
    std::size_t channels = 0;
    std::size_t height = 0;
    std::size_t width = 0;
    span<const std::int64_t> labels;

    beit_seg_batch to_c() const {
        beit_seg_batch b = beit_seg_batch_default();
        b.pixels = pixels.data();
        b.pixels_len = pixels.size();
        b.batch = batch;
        b.channels = channels;
        b.height = height;
        b.width = width;
        b.labels = labels.data();
        b.labels_len = labels.size();
        return b;
    }
};

// What Model::evaluate measured (as `beit eval`).
struct Evaluation {
    std::uint64_t images = 0;   // the whole dataset
    std::uint64_t correct = 0;  // images whose top-1 prediction is their label
    double top1 = 0;            // correct / images (0 for an empty dataset)
    std::size_t num_labels = 0;
    // [num_labels, num_labels] image counts, row = true label, column = prediction
    // (confusion.data[true * num_labels + predicted]).
    BasicTensor<std::uint64_t> confusion;

    // [num_labels]: correct / images of each class (0 for a class without images), as
    // `beit eval --json`'s per_class_accuracy.
    BasicTensor<double> per_class_accuracy() const {
        BasicTensor<double> acc = detail::tensor_of<double>({num_labels});
        for (std::size_t t = 0; t < num_labels; t++) {
            std::uint64_t total = 0;
            for (std::size_t p = 0; p < num_labels; p++) total += confusion.data[t * num_labels + p];
            if (total) acc.data[t] = double(confusion.data[t * num_labels + t]) / double(total);
        }
        return acc;
    }
};

// What Model::evaluate_segmentation measured (as `beit segment eval`).
struct SegmentationEvaluation {
    double mean_iou = 0;        // over the classes present in the masks or the predictions
    double pixel_accuracy = 0;  // correct / scored pixels (the ignore index is not scored)
    std::uint64_t samples = 0;
    std::size_t num_labels = 0;
    // [num_labels]: each class's IoU, NaN for a class in neither the masks nor the predictions.
    BasicTensor<double> per_class_iou;
};

// What Model::segmentation_finetune returns: the trained copy and what the run did.
struct SegmentationResult {
    Model model;
    SegmentationReport report = beit_segmentation_report_default();
};

// A new BeitForImageClassification with `num_labels` labels from this pretrained model
// (BeitForMaskedImageModeling, BeitModel or BeitForImageClassification), as BEiT (and
// `beit finetune --model`) starts fine-tuning: the backbone copied, a fresh head drawn from
// `seed`, the config's drop_path_rate set to `drop_path_rate`.
inline Model Model::to_classifier(const Context& ctx, std::size_t num_labels,
                                  double drop_path_rate, std::uint64_t seed) const {
    beit_model* raw = nullptr;
    check(beit_model_to_classifier(ctx.get(), get(), num_labels, drop_path_rate, seed, &raw));
    return Model(raw);
}

// A fresh BeitForImageClassification from a config.json text (as `beit finetune` without
// --model): BEiT's random initialisation from `seed`.
inline Model Model::create_classifier(const Context& ctx, const std::string& config_json,
                                      std::size_t num_labels, double drop_path_rate,
                                      std::uint64_t seed) {
    beit_model* raw = nullptr;
    check(beit_classifier_create(ctx.get(), config_json.c_str(), num_labels, drop_path_rate, seed,
                                 &raw));
    return Model(raw);
}

// A copy for `height` x `width` inputs (as `beit finetune --image-size`): the same weights,
// the position tables resized as Hugging Face does.
inline Model Model::with_image_size(const Context& ctx, std::size_t height,
                                    std::size_t width) const {
    beit_model* raw = nullptr;
    check(beit_model_with_image_size(ctx.get(), get(), height, width, &raw));
    return Model(raw);
}

// Top-1 accuracy and the confusion matrix of this classifier on every sample of a labelled
// dataset file, as `beit eval` does (each image resized to the model's size, normalised to
// mean = std = 0.5), in batches of `batch_size`. Many threads may evaluate one model at once.
inline Evaluation Model::evaluate(const Context& ctx, const std::string& dataset_path,
                                  std::size_t batch_size) const {
    (void)ctx.get();  // an empty context throws before anything else is checked
    const std::size_t k = info().num_labels;
    Evaluation e;
    e.confusion = detail::tensor_of<std::uint64_t>({k, k});
    beit_evaluation c = beit_evaluation_default();
    c.confusion = e.confusion.data.data();
    c.confusion_len = e.confusion.data.size();
    check(beit_model_evaluate(ctx.get(), get(), dataset_path.c_str(), batch_size, &c));
    e.images = c.images;
    e.correct = c.correct;
    e.top1 = c.top1;
    e.num_labels = c.num_labels;
    return e;
}

// A new BeitForSemanticSegmentation with `num_labels` classes: this model's backbone under a
// fresh UperNet head drawn from `seed` (as `beit segment finetune --model` with a model that
// is not yet a segmentation model).
inline Model Model::to_segmenter(const Context& ctx, std::size_t num_labels,
                                 std::uint64_t seed) const {
    beit_model* raw = nullptr;
    check(beit_model_to_segmenter(ctx.get(), get(), num_labels, seed, &raw));
    return Model(raw);
}

// A fresh BeitForSemanticSegmentation from a config.json text (as `beit segment finetune
// --config`).
inline Model Model::create_segmenter(const Context& ctx, const std::string& config_json,
                                     std::size_t num_labels, std::uint64_t seed) {
    beit_model* raw = nullptr;
    check(beit_segmenter_create(ctx.get(), config_json.c_str(), num_labels, seed, &raw));
    return Model(raw);
}

// Fine-tunes a copy of this segmentation model on a dataset file with masks, as
// `beit segment finetune` does (the train split of options.test_fraction/split_seed); returns
// the trained copy and the report. `progress` runs after every step on this thread: true
// stops the run (the result holds the steps done); an exception it throws stops the run and
// is rethrown from here, the trained copy discarded.
inline SegmentationResult Model::segmentation_finetune(const Context& ctx,
                                                       const std::string& dataset_path,
                                                       const SegmentationOptions& options,
                                                       const SegmentationProgress& progress) const {
    detail::ProgressRelay<SegmentationStep> relay(progress);
    SegmentationResult result;
    beit_model* raw = nullptr;
    const beit_status status =
        beit_segmentation_finetune(ctx.get(), get(), dataset_path.c_str(), &options,
                                   relay.callback(), relay.user_data(), &result.report, &raw);
    result.model = Model(raw);  // owned (and freed) before anything is thrown
    relay.rethrow();
    check(status);
    return result;
}

// mIoU, pixel accuracy and per-class IoU of this segmentation model on a dataset file with
// masks (options.split: the test split, by default, or every sample), as `beit segment eval`.
inline SegmentationEvaluation Model::evaluate_segmentation(
    const Context& ctx, const std::string& dataset_path,
    const SegmentationEvalOptions& options) const {
    (void)ctx.get();  // an empty context throws before anything else is checked
    SegmentationEvaluation e;
    e.per_class_iou = detail::tensor_of<double>({info().num_labels});
    beit_segmentation_evaluation c = beit_segmentation_evaluation_default();
    c.per_class_iou = e.per_class_iou.data.data();
    c.per_class_iou_len = e.per_class_iou.data.size();
    check(beit_model_evaluate_segmentation(ctx.get(), get(), dataset_path.c_str(), &options, &c));
    e.mean_iou = c.mean_iou;
    e.pixel_accuracy = c.pixel_accuracy;
    e.samples = c.samples;
    e.num_labels = c.num_labels;
    return e;
}

// One fine-tuning step on a labelled batch: mean cross-entropy with `label_smoothing` (in
// [0, 1)), backward, clipping, AdamW at the scheduled rate. StepStats::masked is 0.
// Checkpoints resume it bit for bit. On an error the trainer is as before.
inline StepStats Trainer::step_classify(const ClassifyBatch& batch, float label_smoothing) {
    const beit_classify_batch b = batch.to_c();
    StepStats stats = beit_step_stats_default();
    check(beit_trainer_step_classify(get(), &b, label_smoothing, &stats));
    return stats;
}

inline StepStats Trainer::step_segment(const SegBatch& batch) {
    const beit_seg_batch b = batch.to_c();
    StepStats stats = beit_step_stats_default();
    check(beit_trainer_step_segment(get(), &b, &stats));
    return stats;
}

inline PassStats Trainer::forward_backward_segment(const SegBatch& batch) {
    const beit_seg_batch b = batch.to_c();
    PassStats stats = beit_pass_stats_default();
    check(beit_trainer_forward_backward_segment(get(), &b, &stats));
    return stats;
}

// Fine-tunes this classification trainer on a labelled dataset file as `beit finetune` does,
// from its data position until its step count reaches options.steps (0: its total_steps).
// With finetune_trainer_options(steps), a model from to_classifier / create_classifier and
// the same seeds, the weights are bit for bit `beit finetune`'s (CPU, same thread count).
// `progress` runs after every step on this thread: true stops the run (call finetune again
// to go on); an exception it throws stops the run and is rethrown from here. The trainer is
// busy for the whole run: a call on it from `progress` throws BusyError.
inline void Trainer::finetune(const std::string& dataset_path, const FinetuneOptions& options,
                              const StepProgress& progress) {
    detail::ProgressRelay<StepStats> relay(progress);
    const beit_status status = beit_trainer_finetune(get(), dataset_path.c_str(), &options,
                                                     relay.callback(), relay.user_data());
    relay.rethrow();
    check(status);
}

}  // namespace beit

#endif  // BEIT_HPP

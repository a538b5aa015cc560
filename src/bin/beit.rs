//! The `beit` command line: a thin layer over the Rust API. This file parses the arguments and
//! dispatches; each command lives in its own file under `cli/`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[path = "cli/bench.rs"]
mod bench_cli;
#[path = "cli/create.rs"]
mod create_cli;
#[path = "cli/dataset.rs"]
mod dataset_cli;
#[path = "cli/finetune.rs"]
mod finetune_cli;
#[path = "cli/infer.rs"]
mod infer_cli;
#[path = "cli/info.rs"]
mod info_cli;
#[path = "cli/output.rs"]
mod output;
#[path = "cli/pretrain.rs"]
mod pretrain_cli;
#[path = "cli/pretrain_replay.rs"]
mod pretrain_replay_cli;
#[path = "cli/progress.rs"]
mod progress;
#[path = "cli/safety.rs"]
mod safety;
#[path = "cli/segment.rs"]
mod segment_cli;
#[path = "cli/tokenizer.rs"]
mod tokenizer_cli;

#[derive(Parser)]
#[command(name = "beit", version, about = "BEiT vision transformers: inference, pretraining, fine-tuning")]
struct Cli {
    /// How much memory one model, trainer, batch pass, loader or tokenizer may need: `available`
    /// (the default: what this process can still get) or a size such as 512M or 8G. Larger
    /// needs are refused before anything is allocated.
    #[arg(long, global = true, default_value = "available")]
    memory_budget: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe this machine as libbeit sees it (JSON): the device `auto` picks, the GPU, the
    /// driver and NVRTC versions, or why CUDA is not usable.
    Info,
    /// Run a model directory on the tensors of a safetensors file.
    ///
    /// Inputs: `pixel_values` f32 [B,C,H,W], optional `bool_masked_pos` u8 [B,N].
    /// Outputs: `last_hidden_state` (as HF BeitModel returns it), `pooler_output` where the
    /// model has a pooler, `logits` where it has a head.
    Infer(infer_cli::InferArgs),
    /// Create a randomly initialised model (BEiT's init scheme) and save it as an HF directory.
    Create(create_cli::CreateArgs),
    /// Masked-image-modeling pretraining with checkpoints and exact resume.
    ///
    /// Data: `synthetic` (a generated task whose tokens are each patch's quantised brightness
    /// and gradient direction; reproducible from --seed and the batch position). Prints one JSON
    /// line per step with --json. Writes OUT/checkpoint.safetensors (atomically, every
    /// --checkpoint-every steps and at the end) and OUT/model (an HF model directory).
    Pretrain(pretrain_cli::PretrainArgs),
    /// Replay N AdamW steps on one fixed batch (no schedule, no clipping, no drop path unless
    /// asked), print `{"step", "loss"}` per step, and write the updated HF model directory.
    ///
    /// The batch file holds `pixel_values` f32 [B,C,H,W], `bool_masked_pos` u8 [B,N] and
    /// `labels` (integer) [B,N]: the visual token of every patch (only masked ones count).
    PretrainReplay(pretrain_replay_cli::ReplayArgs),
    /// Measure speed. `beit bench infer`: forward passes per second on random pixels.
    /// `beit bench pretrain`: pretraining steps per second.
    Bench {
        #[command(subcommand)]
        what: bench_cli::BenchCommand,
    },
    /// Image datasets in the `.beitds` format (docs/dataset-format.md).
    /// `beit dataset import`: convert IDX, NumPy .npy, image folders or emoji packages.
    /// `beit dataset info`: validate a file and print its header as one JSON line.
    Dataset {
        #[command(subcommand)]
        what: dataset_cli::DatasetCommand,
    },
    /// Visual tokenizers (dVAE). `beit tokenizer train`: train one on a dataset file.
    Tokenizer {
        #[command(subcommand)]
        what: tokenizer_cli::TokenizerCommand,
    },
    /// Tokenize a dataset once into a token cache: a copy of the file whose samples carry the
    /// visual tokens of the whole image, for pretraining's fast path.
    Tokenize(tokenizer_cli::TokenizeArgs),
    /// Fine-tune a pretrained directory (or a fresh model) on a labelled dataset and save an HF
    /// directory. `--task classify`: BeitForImageClassification with BEiT's recipe (layer-wise
    /// lr decay, warmup + cosine, AdamW, label smoothing, drop path, random resized crops).
    /// Prints one JSON line per --log-every steps (step, loss, lr, images/s); progress on stderr.
    Finetune(finetune_cli::FinetuneArgs),
    /// Top-1 accuracy and the confusion matrix of a classifier on a labelled dataset.
    Eval(finetune_cli::EvalArgs),
    /// Semantic segmentation (BeitForSemanticSegmentation): `beit segment finetune`, `beit
    /// segment eval`.
    Segment {
        #[command(subcommand)]
        what: segment_cli::SegmentCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every context the commands create inherits this budget (ContextOptions::memory_budget is
    // None), and so does the work they do outside a context.
    let result = beit::resources::MemoryBudget::parse(&cli.memory_budget)
        .and_then(|budget| beit::resources::with_budget(budget, || run(cli.command)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("beit: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> beit::Result<()> {
    match command {
        Command::Info => info_cli::info(),
        Command::Infer(args) => infer_cli::infer(args),
        Command::Create(args) => create_cli::create(args),
        Command::Pretrain(args) => pretrain_cli::pretrain(args),
        Command::PretrainReplay(args) => pretrain_replay_cli::pretrain_replay(args),
        Command::Bench { what } => bench_cli::run(what),
        Command::Dataset { what } => dataset_cli::dataset(what),
        Command::Tokenizer { what: tokenizer_cli::TokenizerCommand::Train(args) } => tokenizer_cli::train(args),
        Command::Tokenize(args) => tokenizer_cli::tokenize(args),
        Command::Finetune(args) => finetune_cli::finetune(args),
        Command::Eval(args) => finetune_cli::eval(args),
        Command::Segment { what } => segment_cli::run(what),
    }
}

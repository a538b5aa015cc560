//! `beit dataset import|info|combine`: image datasets in the `.beitds` format.

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportFormat {
    /// MNIST-style IDX files (raw or gzip).
    Idx,
    /// NumPy .npy arrays.
    Npy,
    /// A folder with one sub-folder of PNG/JPEG images per class.
    ImageFolder,
    /// An unpacked emoji-datasource-<set> npm package.
    Emoji,
}

#[derive(Subcommand)]
pub enum DatasetCommand {
    /// Convert images (and labels) into a dataset file, written atomically.
    ///
    /// Formats (details in docs/dataset-format.md):
    ///
    /// idx: --images FILE [--labels FILE] [--pad HxW]. MNIST-style IDX, u8 images [N,H,W], u8
    /// labels [N], raw or gzip; --pad centres each image on a black HxW canvas (28 -> 32).
    ///
    /// npy: --images X.npy [--labels Y.npy]. NumPy .npy (v1-v3, C order): images [N,H,W] or
    /// [N,H,W,C] of u1, or f4/f8 in [0,1] (stored as round(x*255)); labels [N] of any integer dtype.
    ///
    /// image-folder: --dir DIR --size HxW [--channels 1|3]. DIR/<class>/*.png|jpg|jpeg; labels are
    /// the sorted class folder names; images are converted to grey or RGB and resized (bilinear)
    /// to HxW. Class names go to OUT.classes.json.
    ///
    /// emoji: --dir PACKAGE --set google|twitter [--size 64]. An unpacked emoji-datasource-<set>
    /// npm package (scripts/fetch-emoji): RGB over black, label = category (sorted), mask =
    /// category + 1 where alpha >= 128, else 0. Category names go to OUT.classes.json.
    #[command(verbatim_doc_comment)]
    Import {
        /// Source format: idx, npy, image-folder or emoji.
        #[arg(long, value_enum, default_value = "idx")]
        format: ImportFormat,
        /// Image file (idx, npy).
        #[arg(long)]
        images: Option<PathBuf>,
        /// Label file (idx, npy; optional).
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Folder to import (image-folder: one sub-folder per class; emoji: the package root).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Output image size, HxW or one number for a square (image-folder: required; emoji:
        /// which img/<set>/<size> folder, default 64).
        #[arg(long)]
        size: Option<String>,
        /// Output channels for image-folder: 1 (grey) or 3 (RGB).
        #[arg(long, default_value_t = 3)]
        channels: u32,
        /// Emoji image set: google or twitter.
        #[arg(long)]
        set: Option<String>,
        /// idx: centre every image on a zero canvas of this size (HxW or one number).
        #[arg(long)]
        pad: Option<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Open (and so fully validate) a dataset file and print count, shape and sections as JSON.
    Info { file: PathBuf },
    /// Write chosen samples of one or more dataset files into a new file, in the order given,
    /// written atomically. Each INPUT is FILE (every sample), FILE:train or FILE:test (the
    /// train or test split of `beit segment finetune` with the same --test-fraction and
    /// --split-seed). E.g. pretraining images without the fine-tune's test images:
    /// `beit dataset combine --out pre.beitds twitter.beitds google.beitds:train`.
    /// Inputs must share one image shape; labels, masks and tokens are kept when every input has
    /// them and dropped otherwise (the JSON line lists what was dropped).
    Combine {
        /// FILE, FILE:train or FILE:test.
        #[arg(required = true)]
        inputs: Vec<String>,
        /// Fraction of each split input's samples in its test split.
        #[arg(long, default_value_t = 0.2)]
        test_fraction: f64,
        /// Seed of the train/test shuffle.
        #[arg(long, default_value_t = 0)]
        split_seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn dataset(what: DatasetCommand) -> beit::Result<()> {
    use beit::data::dataset::{Dataset, DatasetHeader};
    let info = |h: &DatasetHeader, file: &std::path::Path| {
        serde_json::json!({"file": file.display().to_string(), "version": h.version, "count": h.count,
            "height": h.height, "width": h.width, "channels": h.channels, "sections": h.section_names(),
            "token_grid": [h.token_grid_h, h.token_grid_w]})
    };
    match what {
        DatasetCommand::Import { format, images, labels, dir, size, channels, set, pad, out } => {
            use beit::data::import::{self, ImportSource};
            let bad = |m: &str| beit::Error::InvalidArgument(m.to_string());
            let start = std::time::Instant::now();
            if pad.is_some() && format != ImportFormat::Idx {
                return Err(bad("--pad is for --format idx"));
            }
            let source = match format {
                ImportFormat::Idx | ImportFormat::Npy => {
                    let images = images.ok_or_else(|| bad("--images is required for --format idx and npy"))?;
                    if format == ImportFormat::Idx {
                        let pad = pad.as_deref().map(import::images::parse_size).transpose()?;
                        ImportSource::Idx { images, labels, pad }
                    } else {
                        ImportSource::Npy { images, labels }
                    }
                }
                ImportFormat::ImageFolder => {
                    let dir = dir.ok_or_else(|| bad("--dir is required for --format image-folder"))?;
                    let size = size.ok_or_else(|| bad("--size HxW is required for --format image-folder"))?;
                    let (height, width) = import::images::parse_size(&size)?;
                    ImportSource::ImageFolder { dir, height, width, channels }
                }
                ImportFormat::Emoji => {
                    let dir = dir.ok_or_else(|| bad("--dir is required for --format emoji"))?;
                    let set = set.ok_or_else(|| bad("--set google|twitter is required for --format emoji"))?;
                    let (hh, ww) = import::images::parse_size(size.as_deref().unwrap_or("64"))?;
                    if hh != ww {
                        return Err(bad("emoji images are square: give --size as one number"));
                    }
                    ImportSource::Emoji { dir, set, size: hh }
                }
            };
            let imported = import::import(&source, &out, &|name| format!("--{name}"))?;
            crate::safety::report_removed(&imported.removed_temp_files);
            let mut v = info(&imported.header, &out);
            v["command"] = "dataset import".into();
            if let Some(names) = imported.classes {
                v["classes"] = names.into();
                v["classes_file"] = import::classes_path(&out).display().to_string().into();
            }
            v["seconds"] = start.elapsed().as_secs_f64().into();
            crate::output::print_json(v);
        }
        DatasetCommand::Info { file } => {
            let d = Dataset::open(&file)?;
            let mut v = info(d.header(), &file);
            v["command"] = "dataset info".into();
            crate::output::print_json(v);
        }
        DatasetCommand::Combine { inputs, test_fraction, split_seed, out } => {
            use beit::data::subset::{check_test_fraction, split_indices, write_combined};
            check_test_fraction(test_fraction)?;
            let split = |input: &str| -> (String, Option<String>) {
                match input.rsplit_once(':') {
                    Some((f, p @ ("train" | "test"))) => (f.to_string(), Some(p.to_string())),
                    _ => (input.to_string(), None),
                }
            };
            inputs
                .iter()
                .fold(crate::safety::Paths::new(), |paths, input| paths.read("INPUT", split(input).0))
                .write("--out", &out)
                .check()?;
            let mut opened = Vec::new();
            for input in &inputs {
                let (file, part) = split(input);
                let d = Dataset::open(std::path::Path::new(&file))?;
                let indices = match part.as_deref() {
                    None => (0..d.len()).collect(),
                    Some(p) => {
                        let (train, test) = split_indices(d.len(), test_fraction, split_seed)?;
                        if p == "train" {
                            train
                        } else {
                            test
                        }
                    }
                };
                opened.push((d, indices));
            }
            let parts: Vec<_> = opened.iter().map(|(d, i)| (d, i.as_slice())).collect();
            crate::safety::remove_stale_temp_files_of(&out)?;
            let combined = write_combined(&out, &parts)?;
            let mut v = info(&combined.header, &out);
            v["command"] = "dataset combine".into();
            v["inputs"] = inputs
                .iter()
                .zip(&opened)
                .map(|(s, (_, i))| serde_json::json!({"input": s, "samples": i.len()}))
                .collect();
            v["dropped_sections"] = combined.dropped_sections.into();
            crate::output::print_json(v);
        }
    }
    Ok(())
}

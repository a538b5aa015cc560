//! What several commands write: one-line JSON on stdout, and model directories.

use beit::Model;

/// Saves `model` as an HF directory at `dir`, first removing what killed runs left there; a
/// failed save leaves no directory it created.
pub fn save_model(model: &Model, dir: &std::path::Path) -> beit::Result<()> {
    crate::safety::remove_stale_temp_files(dir, &crate::safety::MODEL_FILES)?;
    let out = beit::files::OutputDir::create(dir)?;
    model.save(dir)?;
    out.keep();
    Ok(())
}

pub fn print_json(value: serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

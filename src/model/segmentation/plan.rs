//! The views of a segmentation pass beside the backbone's: the head's [`HeadPlan`], the four
//! levels' hidden states (or their gradients) in token layout, and the loss's buffers. Planned
//! after the backbone's views in the same planner, so both share one arena (the host's training
//! workspace, a GPU driver's device arena) and nothing leaves the device between them.

use crate::backend::memory::{Planner, Space, View};

use super::super::Model;
use super::head::{BnMode, HeadPlan};

/// The views of a segmentation pass beside the backbone's plan, in the same arena.
#[derive(Debug, Clone)]
pub(crate) struct SegPlan {
    pub(super) head: HeadPlan,
    /// The four levels' hidden states `[b, tokens, hidden]` (inference: their copies; training:
    /// their gradients, which the backbone's backward adds in).
    pub(super) tokens: [View; 4],
    /// Training: a logits map upsampled to the labels' size `[b, labels, h, w]`, and the labels
    /// as the loss reads them (`Index`, one per pixel).
    pub(super) up: View,
    pub(super) labels: View,
}

impl Model {
    /// The head's views of a pass over `b` images of `hw` pixels, planned after the backbone's
    /// in `plan` (whose arena they then share).
    pub(crate) fn segmentation_views(&self, plan: &mut Planner, b: usize, hw: (usize, usize), mode: BnMode) -> SegPlan {
        let head = self.segmentation_head().expect("a segmentation model");
        let grid = self.config.grid_for(hw.0, hw.1);
        let rows = b * (grid.0 * grid.1 + 1) * self.config.hidden_size;
        let head_plan = HeadPlan::new(plan, head, b, grid, mode);
        let tokens = std::array::from_fn(|_| plan.act(rows));
        let (up, labels) = match mode {
            BnMode::Eval => (View::empty(Space::Act), View::empty(Space::Index)),
            BnMode::Train => (plan.act(b * head.num_labels * hw.0 * hw.1), plan.index(b * hw.0 * hw.1)),
        };
        SegPlan { head: head_plan, tokens, up, labels }
    }
}

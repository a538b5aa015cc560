package beit_test

import (
	"reflect"
	"testing"

	beit "github.com/libbeit/beit-go"
)

// BeitForSemanticSegmentation through Go: the logits come back as [B, labels, 4gh, 4gw], the
// shape transformers gave them (tests/reference_segmentation), with its numbers; OutputSizes
// says the same shape before any inference.
func TestSegmentationLogitsShape(t *testing.T) {
	ctx := newCPUContext(t)
	for _, name := range []string{"aux_default_40", "aux_concat_32", "noaux_abs_48"} {
		t.Run(name, func(t *testing.T) {
			c := loadCaseIn(t, "reference_segmentation", name)
			m := must(beit.LoadModel(ctx, refDir("reference_segmentation", name)))(t)
			defer m.Close()
			if info := must(m.Info())(t); info.Architecture != beit.ArchSemanticSegmentation {
				t.Fatalf("architecture %v", info.Architecture)
			}
			s := c.shape
			out := must(m.Infer(c.pixels, s[0], s[1], s[2], s[3], nil))(t)
			want := c.wantShape["logits"]
			if len(want) != 4 || !reflect.DeepEqual(out.Logits.Shape, want) {
				t.Fatalf("logits shape %v, transformers %v", out.Logits.Shape, want)
			}
			if sizes := must(m.OutputSizes(s[0], s[2], s[3]))(t); !reflect.DeepEqual(sizes.LogitsShape, want) {
				t.Fatalf("OutputSizes.LogitsShape %v, transformers %v", sizes.LogitsShape, want)
			}
			if r := worstRatio(t, out.Logits.Data, c.want["logits"]); r > 1 {
				t.Errorf("logits: %.3fx the tolerance", r)
			}
		})
	}
}

// Shapes of the other architectures, against hand-derived values: a classifier's logits are
// [B, labels] and its pooler [B, hidden]; a backbone has no logits (zero Tensor, nil shape);
// a non-square input changes the token count.
func TestOutputShapesByArchitecture(t *testing.T) {
	ctx := newCPUContext(t)
	const cfg = `{"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
	 "intermediate_size": 32, "image_size": 16, "patch_size": 4, "num_labels": 5, "use_mean_pooling": true}`
	px := make([]float32, 3*3*16*8)
	for _, tc := range []struct {
		arch                  beit.Architecture
		lhs, pool, logits     []int
		lhsLen, poolLen, nLog int
	}{
		{beit.ArchImageClassification, []int{3, 9, 16}, []int{3, 16}, []int{3, 5}, 3 * 9 * 16, 3 * 16, 15},
		{beit.ArchBackbone, []int{3, 9, 16}, []int{3, 16}, nil, 3 * 9 * 16, 3 * 16, 0},
	} {
		m := must(beit.NewModel(ctx, cfg, tc.arch, 7))(t)
		out := must(m.Infer(px, 3, 3, 16, 8, nil))(t) // 16x8 pixels: a 4x2 patch grid
		m.Close()
		if !reflect.DeepEqual(out.LastHiddenState.Shape, tc.lhs) || out.LastHiddenState.Len() != tc.lhsLen ||
			!reflect.DeepEqual(out.PoolerOutput.Shape, tc.pool) || out.PoolerOutput.Len() != tc.poolLen ||
			!reflect.DeepEqual(out.Logits.Shape, tc.logits) || out.Logits.Len() != tc.nLog {
			t.Errorf("%v: last_hidden_state %v, pooler_output %v, logits %v", tc.arch, out.LastHiddenState,
				out.PoolerOutput, out.Logits)
		}
	}
	if s := (beit.Tensor[float32]{Shape: []int{2, 3}}).String(); s != "Tensor[float32][2 3]" {
		t.Errorf("Tensor.String() = %q", s)
	}
}

// Command train runs BEiT's whole recipe on a toy problem, with nothing but libbeit: it writes
// a labelled dataset of generated images (with a visual-token cache), pretrains a new model
// for 10 steps by masked image modeling on batches from the library's loader (augmentations
// and block-wise masks), turns it into a classifier, fine-tunes that for 10 steps on the
// labels, and prints its top-1 accuracy on a held-out dataset.
//
//	go run -tags beit_intree ./examples/train    (inside the libbeit checkout)
//
// Elsewhere, drop the tag and use an installed libbeit (README.md shows how).
package main

import (
	"fmt"
	"log"
	"os"
	"path/filepath"

	beit "github.com/libbeit/beit-go"
)

const (
	size    = 16 // images are size x size, 1 channel
	patch   = 4  // so the patch grid is 4x4
	classes = 4  // horizontal stripes, vertical stripes, a checkerboard, plain noise
	vocab   = 16 // visual tokens: a patch's brightness in 16 levels
	steps   = 10 // pretraining steps, then fine-tuning steps
)

// config is the new model: a small BEiT for 16x16 grey images (any Hugging Face config.json
// works; "{}" is BEiT-base).
const config = `{"image_size": 16, "patch_size": 4, "num_channels": 1, "hidden_size": 32,
 "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 16,
 "use_mask_token": true, "use_shared_relative_position_bias": true, "drop_path_rate": 0.1}`

func main() {
	if err := run(); err != nil {
		log.Fatal(err)
	}
}

func run() error {
	dir, err := os.MkdirTemp("", "beit-train-example-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	train, test := filepath.Join(dir, "train.beitds"), filepath.Join(dir, "test.beitds")
	if err := writeDataset(train, 128, 1); err != nil {
		return err
	}
	if err := writeDataset(test, 32, 2); err != nil {
		return err
	}
	fmt.Printf("datasets: 128 training and 32 test images, %dx%d, %d classes\n", size, size, classes)

	ctx, err := beit.NewContext(&beit.ContextOptions{Device: beit.DeviceCPU})
	if err != nil {
		return err
	}
	defer ctx.Close()
	pretrained, err := pretrain(ctx, train)
	if err != nil {
		return err
	}
	defer pretrained.Close()
	classifier, err := finetune(ctx, pretrained, train)
	if err != nil {
		return err
	}
	defer classifier.Close()

	e, err := classifier.Evaluate(test, 0)
	if err != nil {
		return err
	}
	fmt.Printf("per-class accuracy %.2f\n", e.PerClassAccuracy())
	fmt.Printf("top-1 %.3f (%d/%d)\n", e.Top1, e.Correct, e.Images)
	return nil
}

// writeDataset writes n generated images with their labels and their visual tokens (the token
// cache that `beit tokenize` would fill from a trained tokenizer) to a dataset file.
func writeDataset(path string, n int, seed uint32) error {
	w, err := beit.NewDatasetWriter(path, beit.DatasetSpec{Height: size, Width: size, Channels: 1, Labels: true,
		TokenGridH: size / patch, TokenGridW: size / patch})
	if err != nil {
		return err
	}
	defer w.Close() // after Finish, a no-op; after an error, it leaves no file behind
	s := beit.Samples{Count: n, Pixels: make([]uint8, n*size*size), Labels: make([]uint32, n),
		Tokens: make([]uint16, n*(size/patch)*(size/patch))}
	rng := seed
	for i := 0; i < n; i++ {
		class := i % classes
		s.Labels[i] = uint32(class)
		img := s.Pixels[i*size*size : (i+1)*size*size]
		phase := i / classes % 8 // where the pattern starts
		for y := 0; y < size; y++ {
			for x := 0; x < size; x++ {
				rng = rng*1664525 + 1013904223 // noise from a linear congruential generator
				v := 40 + int(rng>>27)
				bright := [classes]bool{(y+phase)%8 < 4, (x+phase)%8 < 4, ((x+phase)/4+y/4)%2 == 0, false}[class]
				if bright {
					v += 160
				}
				img[y*size+x] = uint8(v)
			}
		}
		tokens := s.Tokens[i*(size/patch)*(size/patch) : (i+1)*(size/patch)*(size/patch)]
		for py := 0; py < size/patch; py++ {
			for px := 0; px < size/patch; px++ {
				sum := 0
				for y := py * patch; y < (py+1)*patch; y++ {
					for x := px * patch; x < (px+1)*patch; x++ {
						sum += int(img[y*size+x])
					}
				}
				tokens[py*(size/patch)+px] = uint16(sum / (patch * patch) * vocab / 256)
			}
		}
	}
	if err := w.Append(s); err != nil {
		return err
	}
	_, err = w.Finish()
	return err
}

// pretrain creates a BeitForMaskedImageModeling and trains it for a few steps to predict the
// visual tokens of the patches the loader's masks hide; it returns the model it reached.
func pretrain(ctx *beit.Context, data string) (*beit.Model, error) {
	model, err := beit.NewModel(ctx, config, beit.ArchMaskedImageModeling, 1)
	if err != nil {
		return nil, err
	}
	defer model.Close()
	tr, err := beit.NewTrainer(ctx, model, &beit.TrainerOptions{LearningRate: 2e-3, WarmupSteps: 2, TotalSteps: steps})
	if err != nil {
		return nil, err
	}
	defer tr.Close()
	// The loader's batch sizes come from the model; tokens from the dataset's cache.
	loader, err := beit.NewLoader(ctx, data, beit.LoaderOptions{BatchSize: 16, Model: model, Tokens: beit.TokensCached, Seed: 1})
	if err != nil {
		return nil, err
	}
	defer loader.Close()
	for i := 0; i < steps; i++ {
		batch, err := loader.Next()
		if err != nil {
			return nil, err
		}
		s, err := tr.Step(batch.MIMBatch())
		if err != nil {
			return nil, err
		}
		fmt.Printf("pretrain step %d/%d loss %.4f (%d masked patches)\n", s.Step, steps, s.Loss, s.Masked)
	}
	return tr.Model()
}

// finetune makes a 4-class classifier of the pretrained model and fine-tunes it on the labels
// with `beit finetune`'s recipe; it returns the fine-tuned model.
func finetune(ctx *beit.Context, pretrained *beit.Model, data string) (*beit.Model, error) {
	classifier, err := pretrained.ToClassifier(classes, nil)
	if err != nil {
		return nil, err
	}
	defer classifier.Close()
	opts := beit.FinetuneTrainerOptions(steps)
	opts.LearningRate = 5e-3 // 10 steps want more than the recipe's 1e-3
	tr, err := beit.NewTrainer(ctx, classifier, &opts)
	if err != nil {
		return nil, err
	}
	defer tr.Close()
	// Crops of at least half the image (the recipe's 0.08 leaves too little of a 16x16
	// pattern); the other fields are the recipe's.
	data16 := &beit.FinetuneOptions{BatchSize: 16, MinCropScale: 0.5, Seed: 1}
	perEpoch, err := beit.FinetuneEpochSteps(data, data16)
	if err != nil {
		return nil, err
	}
	fmt.Printf("fine-tuning: %d steps of 16 images (an epoch is %d steps)\n", steps, perEpoch)
	err = tr.Finetune(data, data16, func(s beit.StepStats) bool {
		fmt.Printf("finetune step %d/%d loss %.4f lr %.2e\n", s.Step, steps, s.Loss, s.LR)
		return false // true would stop the run here
	})
	if err != nil {
		return nil, err
	}
	return tr.Model()
}

// Command infer loads a BEiT model directory and runs it on a constant image batch, printing
// the model's info and the output shapes.
//
//	go run ./examples/infer [MODEL_DIR]    (default: ../../tests/reference/mim_shared)
package main

import (
	"errors"
	"fmt"
	"log"
	"os"

	beit "github.com/libbeit/beit-go"
)

func main() {
	dir := "../../tests/reference/mim_shared"
	if len(os.Args) > 1 {
		dir = os.Args[1]
	}
	ctx, err := beit.NewContext(&beit.ContextOptions{Device: beit.DeviceCPU})
	if err != nil {
		log.Fatal(err)
	}
	defer ctx.Close()
	model, err := beit.LoadModel(ctx, dir)
	if errors.Is(err, beit.ErrIO) {
		log.Fatalf("no model in %s: %v", dir, err)
	} else if err != nil {
		log.Fatal(err)
	}
	defer model.Close()
	info, err := model.Info()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("libbeit %s: %d layers, hidden %d, %d parameters\n", beit.Version(), info.NumLayers, info.HiddenSize, info.NumParameters)

	const batch = 2
	c, h, w := info.NumChannels, info.ImageHeight, info.ImageWidth
	pixels := make([]float32, batch*c*h*w) // NCHW, normalised; zeros here
	out, err := model.Infer(pixels, batch, c, h, w, nil)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("last_hidden_state [%d %d %d]\n", batch, out.NumTokens, info.HiddenSize)
	if out.Logits != nil {
		fmt.Printf("logits %d values, first %.4f\n", len(out.Logits), out.Logits[0])
	}
	if out.PoolerOutput != nil {
		fmt.Printf("pooler_output [%d %d]\n", batch, info.HiddenSize)
	}
}

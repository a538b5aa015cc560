// Command infer loads a BEiT model directory and runs it on a constant image batch, printing
// the model's info and the output shapes.
//
//	go run -tags beit_intree ./examples/infer [MODEL_DIR]    (default: ../../tests/reference/mim_shared)
//
// (inside the libbeit checkout; elsewhere, drop the tag and use an installed libbeit: README.md)
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
	fmt.Printf("last_hidden_state %v\n", out.LastHiddenState.Shape)
	if out.Logits.Data != nil {
		fmt.Printf("logits %v, first %.4f\n", out.Logits.Shape, out.Logits.Data[0])
	}
	if out.PoolerOutput.Data != nil {
		fmt.Printf("pooler_output %v\n", out.PoolerOutput.Shape)
	}
}

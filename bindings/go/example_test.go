package beit_test

import (
	"fmt"
	"log"
	"os"
	"strings"
	"testing"

	beit "github.com/libbeit/beit-go"
)

// The body of this example, from the marker to the end, is the snippet in README.md
// (TestReadmeSnippetIsExample keeps them the same); go test runs it and checks its output.
func Example() {
	// README snippet begins
	ctx, err := beit.NewContext(nil) // nil: auto device, one thread per core
	if err != nil {
		log.Fatal(err)
	}
	defer ctx.Close()

	model, err := beit.LoadModel(ctx, "../../tests/reference/mim_shared")
	if err != nil {
		log.Fatal(err) // a *beit.Error: errors.Is(err, beit.ErrIO) for a missing dir
	}
	defer model.Close()

	// 2 images, 3 channels, 32x32, NCHW float32; no mask.
	pixels := make([]float32, 2*3*32*32)
	out, err := model.Infer(pixels, 2, 3, 32, 32, nil)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(out.LastHiddenState.Shape, out.Logits.Shape)
	// Output: [2 17 32] [2 16 64]
}

// The README's Go snippet is, character for character, the body of Example above.
func TestReadmeSnippetIsExample(t *testing.T) {
	src, err := os.ReadFile("example_test.go")
	if err != nil {
		t.Fatal(err)
	}
	s := string(src)
	begin := strings.Index(s, "\t// README snippet begins\n")
	end := -1
	if begin >= 0 {
		end = strings.Index(s[begin:], "\n}\n")
	}
	if begin < 0 || end < 0 {
		t.Fatal("snippet markers not found in example_test.go")
	}
	var lines []string
	for _, l := range strings.Split(s[begin:begin+end+1], "\n")[1:] {
		lines = append(lines, strings.TrimPrefix(l, "\t"))
	}
	snippet := strings.Join(lines, "\n")
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(readme), snippet) {
		t.Fatalf("README.md does not contain the Example body:\n%s", snippet)
	}
}

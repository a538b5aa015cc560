package beit_test

import (
	"strings"
	"testing"

	beit "github.com/libbeit/beit-go"
)

// ContextOptions.DeviceIndex reaches the library: a CPU context refuses a GPU index, a cuda
// context one past the driver's GPUs is unsupported, and auto falls back to the CPU there.
func TestContextDeviceIndex(t *testing.T) {
	probe := must(beit.ProbeDevice())(t)
	_, err := beit.NewContext(&beit.ContextOptions{Device: beit.DeviceCPU, DeviceIndex: 1})
	wantErr(t, "cpu with device index 1", err, beit.ErrInvalidArgument)
	if err != nil && !strings.Contains(err.Error(), "device_index 1") {
		t.Errorf("cpu with device index 1: %v", err)
	}
	missing := uint32(probe.DeviceCount)
	_, err = beit.NewContext(&beit.ContextOptions{Device: beit.DeviceCUDA, DeviceIndex: missing})
	wantErr(t, "cuda on a GPU the driver does not have", err, beit.ErrUnsupported)
	auto := must(beit.NewContext(&beit.ContextOptions{Device: beit.DeviceAuto, DeviceIndex: missing, Threads: 1}))(t)
	auto.Close()
	if probe.CUDAUsable {
		gpu := must(beit.NewContext(&beit.ContextOptions{Device: beit.DeviceCUDA, DeviceIndex: 0}))(t)
		gpu.Close()
	}
}

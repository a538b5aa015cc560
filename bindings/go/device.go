package beit

// #include "beit.h"
import "C"

import "fmt"

// String is the device's name as the CLI's --device takes it: "auto", "cpu" or "cuda"; an
// unknown value prints as "Device(N)".
func (d Device) String() string {
	switch d {
	case DeviceAuto:
		return "auto"
	case DeviceCPU:
		return "cpu"
	case DeviceCUDA:
		return "cuda"
	}
	return fmt.Sprintf("Device(%d)", uint32(d))
}

// DeviceInfo is what DeviceAuto picks on this machine and the CUDA probe's findings
// (beit_device_info).
type DeviceInfo struct {
	Kind       Device // what DeviceAuto picks: DeviceCUDA when the probe found a usable GPU, else DeviceCPU
	CUDAUsable bool   // the CUDA probe found a usable GPU (Reason says why not otherwise)
	Name       string // the GPU's name (device 0), or "cpu"
	// ComputeCapabilityMajor and Minor of the GPU (9 and 0 for an H100/H200); 0 without a GPU.
	ComputeCapabilityMajor, ComputeCapabilityMinor int
	TotalMemory                                    uint64 // GPU memory in bytes; 0 without a GPU
	DriverVersion                                  int    // the driver's CUDA version, 1000*major + 10*minor; 0 without a driver
	DeviceCount                                    int    // CUDA devices the driver sees; 0 without a driver
	Reason                                         string // the probe's sentence: the GPU found, or exactly what is missing
}

// ProbeDevice describes the device DeviceAuto would use (beit_get_device_info). The CUDA probe
// runs on the first call of the process (it never fails for a missing driver or GPU: that is
// reported in Reason); later calls give the same report.
func ProbeDevice() (DeviceInfo, error) {
	ci := C.beit_device_info_default()
	if err := call(func() C.beit_status { return C.beit_get_device_info(&ci) }); err != nil {
		return DeviceInfo{}, err
	}
	return DeviceInfo{
		Kind:                   Device(ci.kind),
		CUDAUsable:             ci.cuda_usable != 0,
		Name:                   C.GoString(&ci.name[0]),
		ComputeCapabilityMajor: int(ci.compute_capability_major),
		ComputeCapabilityMinor: int(ci.compute_capability_minor),
		TotalMemory:            uint64(ci.total_memory),
		DriverVersion:          int(ci.driver_version),
		DeviceCount:            int(ci.device_count),
		Reason:                 C.GoString(&ci.reason[0]),
	}, nil
}

// Command migdeviceplugin is a test stand-in for NVIDIA's device plugin in its
// "mixed" MIG strategy: for a layout read from a file it advertises one
// resource nvidia.com/mig-<profile> per profile to the kubelet (device-plugin
// API v1beta1), with device IDs in the GPU Operator's form MIG-<uuid>, and
// answers Allocate with NVIDIA_VISIBLE_DEVICES naming the granted devices.
//
// The layout file is JSON, profile to count: {"1g.10gb": 2, "3g.40gb": 1}.
// On SIGHUP the plugin re-reads it and re-registers, as a MIG re-partition
// by the GPU Operator's mig-manager does; when the kubelet restarts (and so
// wipes the plugin sockets) it re-registers too. Only the e2e tests use it.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

const resourcePrefix = "nvidia.com/mig-"

// deviceID derives a stable MIG device UUID from the node, profile and index,
// so a test can predict the IDs and the same layout yields the same IDs.
func deviceID(node, profile string, index int) string {
	sum := sha256.Sum256([]byte(fmt.Sprintf("%s/%s/%d", node, profile, index)))
	h := fmt.Sprintf("%x", sum[:16])
	return fmt.Sprintf("MIG-%s-%s-%s-%s-%s", h[0:8], h[8:12], h[12:16], h[16:20], h[20:32])
}

func readLayout(path string) (map[string]int, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	layout := map[string]int{}
	if err := json.Unmarshal(data, &layout); err != nil {
		return nil, fmt.Errorf("layout %s: %w", path, err)
	}
	return layout, nil
}

// profilePlugin serves one resource (one MIG profile) on its own socket.
type profilePlugin struct {
	pluginapi.UnimplementedDevicePluginServer
	profile string
	devices []*pluginapi.Device
	socket  string
	server  *grpc.Server
	stop    chan struct{}
}

func (p *profilePlugin) resourceName() string { return resourcePrefix + p.profile }

func (p *profilePlugin) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

func (p *profilePlugin) ListAndWatch(_ *pluginapi.Empty, stream grpc.ServerStreamingServer[pluginapi.ListAndWatchResponse]) error {
	if err := stream.Send(&pluginapi.ListAndWatchResponse{Devices: p.devices}); err != nil {
		return err
	}
	select {
	case <-p.stop:
	case <-stream.Context().Done():
	}
	return nil
}

func (p *profilePlugin) Allocate(_ context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	known := map[string]bool{}
	for _, d := range p.devices {
		known[d.ID] = true
	}
	resp := &pluginapi.AllocateResponse{}
	for _, creq := range req.ContainerRequests {
		for _, id := range creq.DevicesIds {
			if !known[id] {
				return nil, fmt.Errorf("unknown %s device %q", p.resourceName(), id)
			}
		}
		log.Printf("allocate %s: %s", p.resourceName(), strings.Join(creq.DevicesIds, ","))
		resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerAllocateResponse{
			Envs: map[string]string{
				"NVIDIA_VISIBLE_DEVICES":    strings.Join(creq.DevicesIds, ","),
				"MIGCHAIN_TEST_MIG_PROFILE": p.profile,
			},
		})
	}
	return resp, nil
}

func (p *profilePlugin) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}

func (p *profilePlugin) GetPreferredAllocation(context.Context, *pluginapi.PreferredAllocationRequest) (*pluginapi.PreferredAllocationResponse, error) {
	return &pluginapi.PreferredAllocationResponse{}, nil
}

func (p *profilePlugin) start(dir string) error {
	p.socket = filepath.Join(dir, "migchain-mig-"+p.profile+".sock")
	_ = os.Remove(p.socket)
	listener, err := net.Listen("unix", p.socket)
	if err != nil {
		return err
	}
	p.stop = make(chan struct{})
	p.server = grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(p.server, p)
	go func() { _ = p.server.Serve(listener) }()
	return nil
}

func (p *profilePlugin) halt() {
	close(p.stop)
	p.server.Stop()
	_ = os.Remove(p.socket)
}

func (p *profilePlugin) register(kubeletSocket string) error {
	conn, err := grpc.NewClient("unix://"+kubeletSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = pluginapi.NewRegistrationClient(conn).Register(ctx, &pluginapi.RegisterRequest{
		Version:      pluginapi.Version,
		Endpoint:     filepath.Base(p.socket),
		ResourceName: p.resourceName(),
		Options:      &pluginapi.DevicePluginOptions{},
	})
	return err
}

// fleet holds the plugins of the current layout.
type fleet struct {
	mu      sync.Mutex
	node    string
	layout  string
	dir     string
	plugins []*profilePlugin
}

func (f *fleet) haltAll() {
	for _, p := range f.plugins {
		p.halt()
	}
	f.plugins = nil
}

// reload stops every plugin, re-reads the layout and serves and registers it.
func (f *fleet) reload() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.haltAll()
	layout, err := readLayout(f.layout)
	if err != nil {
		return err
	}
	profiles := make([]string, 0, len(layout))
	for profile := range layout {
		profiles = append(profiles, profile)
	}
	sort.Strings(profiles)
	for _, profile := range profiles {
		p := &profilePlugin{profile: profile}
		for i := 0; i < layout[profile]; i++ {
			p.devices = append(p.devices, &pluginapi.Device{ID: deviceID(f.node, profile, i), Health: pluginapi.Healthy})
		}
		if err := p.start(f.dir); err != nil {
			return err
		}
		f.plugins = append(f.plugins, p)
		if err := p.register(filepath.Join(f.dir, "kubelet.sock")); err != nil {
			return fmt.Errorf("register %s: %w", p.resourceName(), err)
		}
		log.Printf("registered %s with %d devices", p.resourceName(), len(p.devices))
	}
	return nil
}

// socketsGone tells whether the kubelet wiped our sockets (it does on start).
func (f *fleet) socketsGone() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, p := range f.plugins {
		if _, err := os.Stat(p.socket); err != nil {
			return true
		}
	}
	return false
}

func main() {
	node := flag.String("node", "", "node name, salts the device IDs")
	layout := flag.String("layout", "", "JSON layout file, MIG profile to device count")
	dir := flag.String("plugin-dir", pluginapi.DevicePluginPath, "kubelet device-plugin directory")
	flag.Parse()
	if *layout == "" {
		log.Fatal("--layout is required")
	}
	f := &fleet{node: *node, layout: *layout, dir: *dir}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	done := make(chan os.Signal, 1)
	signal.Notify(done, syscall.SIGTERM, syscall.SIGINT)
	healthy := false
	ticker := time.NewTicker(time.Second)
	defer ticker.Stop()
	for {
		if !healthy {
			if err := f.reload(); err != nil {
				log.Printf("reload: %v (retrying)", err)
			} else {
				healthy = true
			}
		}
		select {
		case <-hup:
			log.Printf("SIGHUP: re-reading %s", *layout)
			healthy = false
		case <-done:
			f.mu.Lock()
			f.haltAll()
			f.mu.Unlock()
			return
		case <-ticker.C:
			if healthy && f.socketsGone() {
				log.Printf("plugin sockets gone (kubelet restarted): re-registering")
				healthy = false
			}
		}
	}
}

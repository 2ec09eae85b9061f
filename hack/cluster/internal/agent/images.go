// Package agent is the RecJob test cluster's node agent: a virtual-kubelet provider that
// runs every pod bound to its node as local processes, each pod in its own network,
// mount, UTS, IPC and PID namespaces, with the pod's volumes bind-mounted where its
// containers expect them.
package agent

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"
)

// Image is what the agent runs for a container image that cannot be pulled here: a
// local environment holding what the image's Dockerfile installs.
type Image struct {
	// Env is the image's environment (ENV lines), PATH first of all.
	Env map[string]string `json:"env"`
	// Entrypoint and Cmd are the image's ENTRYPOINT and CMD.
	Entrypoint []string `json:"entrypoint"`
	Cmd        []string `json:"cmd"`
	// WorkingDir is the image's WORKDIR ("/" when empty).
	WorkingDir string `json:"workingDir"`
	// User is the image's USER as "uid" or "uid:gid" (root when empty).
	User string `json:"user"`
	// Files are paths of the image's filesystem bound to host files or folders
	// (e.g. "/manager" -> the Training Operator binary built from its Go module).
	Files map[string]string `json:"files"`
}

// Catalog maps image references to local environments; it is re-read when its file
// changes (a rebuilt image is "pulled" by the next container start).
type Catalog struct {
	Images map[string]Image `json:"images"`

	path     string
	mu       sync.Mutex
	modified time.Time
}

// LoadCatalog reads the catalog written by `make cluster` (hack/cluster/cluster.py).
func LoadCatalog(path string) (*Catalog, error) {
	c := &Catalog{path: path}
	return c, c.reload()
}

func (c *Catalog) reload() error {
	info, err := os.Stat(c.path)
	if err != nil {
		return err
	}
	if info.ModTime().Equal(c.modified) {
		return nil
	}
	data, err := os.ReadFile(c.path)
	if err != nil {
		return err
	}
	var fresh Catalog
	if err := json.Unmarshal(data, &fresh); err != nil {
		return fmt.Errorf("%s: %w", c.path, err)
	}
	c.Images, c.modified = fresh.Images, info.ModTime()
	return nil
}

// Lookup finds an image by its exact reference, then by "repository:*" (any tag). A
// miss is what a kubelet reports as ErrImagePull: the image does not exist here.
func (c *Catalog) Lookup(reference string) (Image, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	_ = c.reload()
	if image, ok := c.Images[reference]; ok {
		return image, true
	}
	repository := reference
	if at := strings.LastIndex(repository, "@"); at >= 0 {
		repository = repository[:at]
	}
	if colon := strings.LastIndex(repository, ":"); colon > strings.LastIndex(repository, "/") {
		repository = repository[:colon]
	}
	image, ok := c.Images[repository+":*"]
	return image, ok
}

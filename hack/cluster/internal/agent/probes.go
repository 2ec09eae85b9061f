package agent

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// probe runs the container's readiness and liveness probes while the pod lives: an
// httpGet or tcpSocket probe reaches the pod IP from the host, as a kubelet does; exec
// probes run inside the pod's network namespace. A failed liveness probe kills the
// container (its restart policy then applies).
func (r *podRuntime) probe(c *containerState) {
	if c.spec.ReadinessProbe != nil {
		go r.loop(c, c.spec.ReadinessProbe, func(ok bool) {
			r.mu.Lock()
			changed := c.state.Running != nil && c.ready != ok
			if c.state.Running != nil {
				c.ready = ok
			}
			r.mu.Unlock()
			if changed {
				r.p.notify(r)
			}
		})
	}
	if c.spec.LivenessProbe != nil {
		go r.loop(c, c.spec.LivenessProbe, func(ok bool) {
			if ok {
				return
			}
			r.mu.Lock()
			cmd := c.cmd
			r.mu.Unlock()
			if cmd != nil && cmd.Process != nil {
				r.p.log.Printf("pod %s/%s: container %s failed its liveness probe; killing it", r.pod.Namespace, r.pod.Name, c.spec.Name)
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			}
		})
	}
}

func (r *podRuntime) loop(c *containerState, p *corev1.Probe, report func(bool)) {
	period := time.Duration(max(p.PeriodSeconds, 1)) * time.Second
	success, failure := max(p.SuccessThreshold, 1), max(p.FailureThreshold, 1)
	var okRun, failRun int32
	lastRun := -1
	for {
		r.mu.Lock()
		running, runID := c.state.Running != nil, c.runID
		r.mu.Unlock()
		if runID != lastRun { // a (re)started container: initial delay again
			lastRun, okRun, failRun = runID, 0, 0
			if !r.sleep(time.Duration(p.InitialDelaySeconds) * time.Second) {
				return
			}
		}
		if running {
			if r.check(c, p) == nil {
				okRun, failRun = okRun+1, 0
				if okRun >= success {
					report(true)
				}
			} else {
				failRun, okRun = failRun+1, 0
				if failRun >= failure {
					report(false)
					failRun = 0
				}
			}
		}
		if !r.sleep(period) {
			return
		}
	}
}

func (r *podRuntime) port(c *containerState, port intstr.IntOrString) (int, error) {
	if port.Type == intstr.Int {
		return port.IntValue(), nil
	}
	for _, p := range c.spec.Ports {
		if p.Name == port.StrVal {
			return int(p.ContainerPort), nil
		}
	}
	if n, err := strconv.Atoi(port.StrVal); err == nil {
		return n, nil
	}
	return 0, fmt.Errorf("no port named %q", port.StrVal)
}

func (r *podRuntime) check(c *containerState, p *corev1.Probe) error {
	timeout := time.Duration(max(p.TimeoutSeconds, 1)) * time.Second
	ip := r.sb.net.IP.String()
	switch {
	case p.HTTPGet != nil:
		port, err := r.port(c, p.HTTPGet.Port)
		if err != nil {
			return err
		}
		scheme := "http"
		if p.HTTPGet.Scheme == corev1.URISchemeHTTPS {
			scheme = "https"
		}
		client := &http.Client{Timeout: timeout}
		resp, err := client.Get(fmt.Sprintf("%s://%s/%s", scheme, net.JoinHostPort(ip, strconv.Itoa(port)), trimSlash(p.HTTPGet.Path)))
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode < 200 || resp.StatusCode >= 400 {
			return fmt.Errorf("HTTP %d", resp.StatusCode)
		}
		return nil
	case p.TCPSocket != nil:
		port, err := r.port(c, p.TCPSocket.Port)
		if err != nil {
			return err
		}
		conn, err := net.DialTimeout("tcp", net.JoinHostPort(ip, strconv.Itoa(port)), timeout)
		if err != nil {
			return err
		}
		return conn.Close()
	case p.Exec != nil:
		ctx, cancel := context.WithTimeout(r.ctx, timeout)
		defer cancel()
		args := append([]string{"--net=" + r.sb.net.NetnsPath(), "--"}, p.Exec.Command...)
		return exec.CommandContext(ctx, "nsenter", args...).Run()
	}
	return nil
}

func trimSlash(s string) string {
	for len(s) > 0 && s[0] == '/' {
		s = s[1:]
	}
	return s
}

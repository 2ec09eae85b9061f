package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// podSandbox is what the containers of one pod share: network namespace, hostname,
// /etc/hosts, /etc/resolv.conf and /dev/shm.
type podSandbox struct {
	net          *Sandbox
	hostname     string
	hostsFile    string
	resolvFile   string
	hostnameFile string
	shm          string
}

// containerState is one container's live state, turned into a ContainerStatus.
type containerState struct {
	spec      corev1.Container
	init      bool
	cmd       *exec.Cmd
	exited    chan struct{}
	state     corev1.ContainerState
	lastState corev1.ContainerState
	restarts  int32
	ready     bool
	started   bool
	runID     int
}

// podRuntime runs one pod: sandbox, volumes, init containers in order, then the
// containers, each restarted by the pod's restartPolicy with exponential back-off.
type podRuntime struct {
	p      *Provider
	pod    *corev1.Pod
	dir    string
	sb     *podSandbox
	vols   map[string]volumeSource
	ctx    context.Context
	cancel context.CancelFunc

	mu         sync.Mutex
	containers []*containerState // init containers first
	phase      corev1.PodPhase
	startTime  metav1.Time
	stopping   bool
	done       chan struct{}
	initDone   bool
	conds      map[corev1.PodConditionType]corev1.PodCondition
}

func newPodRuntime(p *Provider, pod *corev1.Pod) *podRuntime {
	ctx, cancel := context.WithCancel(context.Background())
	r := &podRuntime{p: p, pod: pod.DeepCopy(), ctx: ctx, cancel: cancel, phase: corev1.PodPending,
		startTime: metav1.Now(), done: make(chan struct{}),
		dir: filepath.Join(p.stateDir, "pods", string(pod.UID))}
	waiting := corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}}
	for _, c := range pod.Spec.InitContainers {
		r.containers = append(r.containers, &containerState{spec: c, init: true,
			state: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "PodInitializing"}}})
	}
	for _, c := range pod.Spec.Containers {
		r.containers = append(r.containers, &containerState{spec: c, state: waiting})
	}
	return r
}

func (r *podRuntime) logPath(c *containerState) string {
	return filepath.Join(r.dir, "containers", c.spec.Name, "log")
}

// run is the pod's life, in its own goroutine.
func (r *podRuntime) run() {
	defer close(r.done)
	for {
		err := r.setup()
		if err == nil {
			break
		}
		r.fail("ContainerCreating", err) // e.g. a claim not bound yet: retried like a kubelet
		if !r.sleep(r.p.restartBackoff) {
			return
		}
	}
	go r.refreshVolumes()
	var inits, mains []*containerState
	for _, c := range r.containers {
		if c.init {
			inits = append(inits, c)
		} else {
			mains = append(mains, c)
		}
	}
	for _, c := range inits {
		if !r.runContainer(c) {
			r.finish()
			return
		}
	}
	r.mu.Lock()
	r.initDone = true
	r.mu.Unlock()
	var wg sync.WaitGroup
	for _, c := range mains {
		wg.Add(1)
		go func(c *containerState) { defer wg.Done(); r.runContainer(c) }(c)
		go r.probe(c)
	}
	wg.Wait()
	r.finish()
}

func (r *podRuntime) setup() error {
	pod := r.pod
	if err := os.MkdirAll(r.dir, 0o755); err != nil {
		return err
	}
	if r.sb != nil { // the sandbox exists: only the volumes are retried
		return r.setupVolumes()
	}
	id := strings.ReplaceAll(string(pod.UID), "-", "")[:10]
	netns, err := r.p.network.Create(id)
	if err != nil {
		return err
	}
	hostname := pod.Spec.Hostname
	if hostname == "" {
		hostname = pod.Name
	}
	if len(hostname) > 63 {
		hostname = hostname[:63]
	}
	sb := &podSandbox{net: netns, hostname: hostname, shm: filepath.Join(r.dir, "shm"),
		hostsFile: filepath.Join(r.dir, "hosts"), resolvFile: filepath.Join(r.dir, "resolv.conf"),
		hostnameFile: filepath.Join(r.dir, "hostname")}
	r.mu.Lock()
	r.sb = sb
	r.mu.Unlock()
	fqdn := hostname
	if pod.Spec.Subdomain != "" {
		fqdn = fmt.Sprintf("%s.%s.%s.svc.%s %s", hostname, pod.Spec.Subdomain, pod.Namespace, r.p.clusterDomain, hostname)
	}
	hosts := fmt.Sprintf("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n%s\t%s\n", netns.IP, fqdn)
	for _, alias := range pod.Spec.HostAliases {
		hosts += alias.IP + "\t" + strings.Join(alias.Hostnames, " ") + "\n"
	}
	search := fmt.Sprintf("%[1]s.svc.%[2]s svc.%[2]s %[2]s", pod.Namespace, r.p.clusterDomain)
	resolv := fmt.Sprintf("nameserver %s\nsearch %s\noptions ndots:5\n", r.p.network.Gateway, search)
	for path, content := range map[string]string{sb.hostsFile: hosts, sb.resolvFile: resolv, sb.hostnameFile: hostname + "\n"} {
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(sb.shm, 0o1777); err != nil {
		return err
	}
	_ = os.Chmod(sb.shm, 0o1777)
	return r.setupVolumes()
}

func (r *podRuntime) setupVolumes() error {
	vols, err := r.p.prepareVolumes(r.ctx, r.podWithIP(), r.dir)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.vols = vols
	for _, c := range r.containers {
		if w := c.state.Waiting; w != nil && w.Reason == "ContainerCreating" {
			w.Message = ""
		}
	}
	r.mu.Unlock()
	r.p.notify(r)
	return nil
}

func (r *podRuntime) podWithIP() *corev1.Pod {
	pod := r.pod.DeepCopy()
	if r.sb != nil {
		pod.Status.PodIP = r.sb.net.IP.String()
	}
	pod.Status.HostIP = r.p.hostIP
	return pod
}

// refreshVolumes keeps ConfigMap/Secret/projected volumes current, as a kubelet's
// periodic sync does (ServiceAccount tokens are renewed well before they expire).
func (r *podRuntime) refreshVolumes() {
	ticker := time.NewTicker(r.p.volumeRefresh)
	defer ticker.Stop()
	gid := -1
	if sc := r.pod.Spec.SecurityContext; sc != nil && sc.FSGroup != nil {
		gid = int(*sc.FSGroup)
	}
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-ticker.C:
		}
		for _, v := range r.pod.Spec.Volumes {
			if src, ok := r.vols[v.Name]; ok && src.dynamic {
				if err := r.p.refreshVolume(r.ctx, r.podWithIP(), v, src.path, gid); err != nil {
					r.p.log.Printf("pod %s/%s: refresh volume %s: %v", r.pod.Namespace, r.pod.Name, v.Name, err)
				}
			}
		}
	}
}

func (r *podRuntime) fail(reason string, err error) {
	r.p.log.Printf("pod %s/%s: %s: %v", r.pod.Namespace, r.pod.Name, reason, err)
	r.mu.Lock()
	for _, c := range r.containers {
		if c.state.Terminated == nil {
			c.state = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: reason, Message: err.Error()}}
		}
	}
	r.mu.Unlock()
	r.p.notify(r)
}

// runContainer runs one container until it needs no restart; false if the pod fails.
func (r *podRuntime) runContainer(c *containerState) bool {
	cdir := filepath.Join(r.dir, "containers", c.spec.Name)
	if err := os.MkdirAll(cdir, 0o755); err != nil {
		r.fail("CreateContainerError", err)
		return false
	}
	backoff := r.p.restartBackoff
	for {
		if r.ctx.Err() != nil {
			return false
		}
		image, ok := r.p.images.Lookup(c.spec.Image)
		if !ok {
			r.setWaiting(c, "ErrImagePull", fmt.Sprintf("image %q is not in this cluster's image catalog", c.spec.Image))
			if !r.sleep(backoff) {
				return false
			}
			r.setWaiting(c, "ImagePullBackOff", fmt.Sprintf("Back-off pulling image %q", c.spec.Image))
			backoff = min(2*backoff, r.p.maxBackoff)
			continue
		}
		l, err := buildLaunch(r.pod, &c.spec, image, r.sb, r.vols, cdir)
		if err != nil {
			var ce configError
			reason := "CreateContainerError"
			if errors.As(err, &ce) {
				reason = "CreateContainerConfigError"
			}
			r.setWaiting(c, reason, err.Error())
			if !r.sleep(backoff) {
				return false
			}
			backoff = min(2*backoff, r.p.maxBackoff)
			continue
		}
		cmd, exited, err := l.start(r.sb.net.NetnsPath(), cdir, r.logPath(c))
		if err != nil {
			r.setWaiting(c, "RunContainerError", err.Error())
			if !r.sleep(backoff) {
				return false
			}
			continue
		}
		started := metav1.Now()
		r.mu.Lock()
		c.cmd, c.exited, c.runID = cmd, exited, c.runID+1
		c.state = corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: started}}
		c.started = true
		c.ready = c.spec.ReadinessProbe == nil && !c.init
		r.phase = corev1.PodRunning
		r.mu.Unlock()
		r.p.notify(r)

		<-exited
		code := exitCode(cmd.ProcessState)
		reason := "Completed"
		if code != 0 {
			reason = "Error"
		}
		terminated := corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
			ExitCode: code, Reason: reason, StartedAt: started, FinishedAt: metav1.Now(),
			Message:     terminationMessage(&c.spec, cdir, r.logPath(c), code),
			ContainerID: fmt.Sprintf("recjob://%s/%s/%d", r.pod.UID, c.spec.Name, c.runID)}}
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			terminated.Terminated.Signal = int32(ws.Signal())
		}
		r.mu.Lock()
		c.state, c.ready, c.cmd = terminated, false, nil
		stopping := r.stopping
		r.mu.Unlock()

		policy := r.pod.Spec.RestartPolicy
		restart := policy == corev1.RestartPolicyAlways || (policy == corev1.RestartPolicyOnFailure && code != 0)
		if c.init && policy == corev1.RestartPolicyAlways {
			restart = code != 0
		}
		if stopping || !restart {
			r.p.notify(r)
			return code == 0 || !c.init
		}
		// CrashLoopBackOff, then start again with the last run kept as lastState
		r.mu.Lock()
		c.lastState = terminated
		c.restarts++
		c.state = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "CrashLoopBackOff",
			Message: fmt.Sprintf("back-off %s restarting failed container=%s pod=%s", backoff, c.spec.Name, r.pod.Name)}}
		r.mu.Unlock()
		r.p.notify(r)
		if time.Since(started.Time) > 10*time.Minute {
			backoff = r.p.restartBackoff
		}
		if !r.sleep(backoff) {
			return false
		}
		backoff = min(2*backoff, r.p.maxBackoff)
	}
}

func (r *podRuntime) sleep(d time.Duration) bool {
	select {
	case <-r.ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

func (r *podRuntime) setWaiting(c *containerState, reason, message string) {
	r.mu.Lock()
	c.state = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: reason, Message: message}}
	r.mu.Unlock()
	r.p.notify(r)
}

// finish sets the pod's final phase from its containers.
func (r *podRuntime) finish() {
	r.mu.Lock()
	failed := false
	for _, c := range r.containers {
		if t := c.state.Terminated; t == nil || t.ExitCode != 0 {
			failed = true
		}
	}
	if failed {
		r.phase = corev1.PodFailed
	} else {
		r.phase = corev1.PodSucceeded
	}
	r.mu.Unlock()
	r.p.notify(r)
}

// stop ends every container: SIGTERM to each process group, SIGKILL after the grace
// period; then the sandbox goes.
func (r *podRuntime) stop(grace time.Duration) {
	r.mu.Lock()
	r.stopping = true
	cmds := []*exec.Cmd{}
	exits := []chan struct{}{}
	for _, c := range r.containers {
		if c.cmd != nil && c.cmd.Process != nil {
			cmds = append(cmds, c.cmd)
			exits = append(exits, c.exited)
		}
	}
	r.mu.Unlock()
	for _, cmd := range cmds {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
	}
	deadline := time.Now().Add(grace)
	for i, cmd := range cmds {
		select {
		case <-exits[i]:
		case <-time.After(time.Until(deadline)):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		}
	}
	r.cancel()
	select {
	case <-r.done:
	case <-time.After(grace + 5*time.Second):
	}
	r.mu.Lock()
	for _, c := range r.containers {
		if c.state.Terminated == nil {
			c.state = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
				ExitCode: 137, Reason: "Error", FinishedAt: metav1.Now()}}
		}
	}
	sb := r.sb
	r.mu.Unlock()
	if sb != nil {
		r.p.network.Delete(sb.net)
	}
}

// status is the pod's PodStatus as a kubelet would write it.
func (r *podRuntime) status() corev1.PodStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	status := corev1.PodStatus{Phase: r.phase,
		HostIP: r.p.hostIP, HostIPs: []corev1.HostIP{{IP: r.p.hostIP}}, StartTime: &r.startTime}
	if r.sb != nil {
		status.PodIP = r.sb.net.IP.String()
		status.PodIPs = []corev1.PodIP{{IP: status.PodIP}}
	}
	allReady := true
	for _, c := range r.containers {
		started := c.started && c.state.Running != nil
		cs := corev1.ContainerStatus{Name: c.spec.Name, Image: c.spec.Image, ImageID: "recjob-local://" + c.spec.Image,
			State: c.state, LastTerminationState: c.lastState, RestartCount: c.restarts,
			Ready: c.ready, Started: &started}
		if c.state.Running != nil || c.state.Terminated != nil {
			cs.ContainerID = fmt.Sprintf("recjob://%s/%s/%d", r.pod.UID, c.spec.Name, c.runID)
		}
		if c.init {
			status.InitContainerStatuses = append(status.InitContainerStatuses, cs)
		} else {
			status.ContainerStatuses = append(status.ContainerStatuses, cs)
			allReady = allReady && c.ready
		}
	}
	cond := func(t corev1.PodConditionType, ok bool) corev1.PodCondition {
		s := corev1.ConditionFalse
		if ok {
			s = corev1.ConditionTrue
		}
		if r.conds == nil {
			r.conds = map[corev1.PodConditionType]corev1.PodCondition{}
		}
		if old, seen := r.conds[t]; seen && old.Status == s {
			return old
		}
		r.conds[t] = corev1.PodCondition{Type: t, Status: s, LastTransitionTime: metav1.Now()}
		return r.conds[t]
	}
	running := r.phase == corev1.PodRunning
	status.Conditions = []corev1.PodCondition{
		cond(corev1.PodReadyToStartContainers, r.sb != nil),
		cond(corev1.PodInitialized, r.initDone),
		cond(corev1.ContainersReady, running && allReady),
		cond(corev1.PodReady, running && allReady),
		cond(corev1.PodScheduled, true),
	}
	return status
}

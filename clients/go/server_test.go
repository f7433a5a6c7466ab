package halflife_test

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// address of the live server that TestMain starts for every test.
var address string

// TestMain runs the tests against a real Halflife server on 127.0.0.1: the
// repository's .venv/bin/halflife (or $HALFLIFE_BIN), a temporary data
// directory and the model in $HALFLIFE_TEST_MODEL_DIR; stopped with SIGTERM,
// and sent SIGTERM by the kernel if this process dies without stopping it.
func TestMain(m *testing.M) {
	// Pdeathsig fires when the thread that started the child ends, not the
	// process: keep the server's start on this thread, which lives to os.Exit.
	runtime.LockOSThread()
	stop, err := startServer()
	if err != nil {
		fmt.Fprintln(os.Stderr, "cannot start a Halflife server:", err)
		os.Exit(1)
	}
	code := m.Run()
	if err := stop(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

func startServer() (func() error, error) {
	cwd, err := os.Getwd()
	if err != nil {
		return nil, err
	}
	repo := filepath.Join(cwd, "..", "..")
	bin := os.Getenv("HALFLIFE_BIN")
	if bin == "" {
		bin = filepath.Join(repo, ".venv", "bin", "halflife")
	}
	modelDir := os.Getenv("HALFLIFE_TEST_MODEL_DIR")
	if modelDir == "" {
		modelDir = filepath.Join("var", "models", "all-MiniLM-L6-v2")
	}
	if !filepath.IsAbs(modelDir) {
		modelDir = filepath.Join(repo, modelDir)
	}
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("no halflife executable (run 'make install' or set HALFLIFE_BIN): %w", err)
	}
	if _, err := os.Stat(filepath.Join(modelDir, "manifest.json")); err != nil {
		return nil, fmt.Errorf("no exported model (run 'make model' or set HALFLIFE_TEST_MODEL_DIR): %w", err)
	}
	dataDir, err := os.MkdirTemp("", "halflife-go-test-")
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "serve", "--host", "127.0.0.1", "--port", "0", "--model-dir", modelDir, "--data-dir", dataDir)
	// A panicking test, log.Fatal or go test's timeout exit without stop():
	// the kernel then sends the server SIGTERM. In its own process group, a
	// terminal's Ctrl-C stops only the tests, and the server gets SIGTERM too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	reader, writer := io.Pipe()
	cmd.Stdout, cmd.Stderr = writer, writer
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dataDir)
		return nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait(); writer.Close() }()

	found := make(chan string, 1)
	output := make(chan string, 1) // the log up to "serving on", once the server's output ends
	go func() {
		var log strings.Builder
		serving := regexp.MustCompile(`serving on (127\.0\.0\.1:\d+)`)
		lines := bufio.NewScanner(reader)
		for lines.Scan() {
			log.WriteString(lines.Text() + "\n")
			if m := serving.FindStringSubmatch(lines.Text()); m != nil {
				found <- m[1]
				break
			}
		}
		io.Copy(io.Discard, reader) // keep draining the server's log
		output <- log.String()
	}()
	fail := func(err error) (func() error, error) { // the server has exited or been killed
		log := "(none: its output did not end)"
		select {
		case log = <-output: // the output ends when Wait has returned: no server is left
		case <-time.After(10 * time.Second):
		}
		os.RemoveAll(dataDir)
		return nil, fmt.Errorf("%v; its output:\n%s", err, log)
	}
	select {
	case address = <-found:
	case err := <-exited:
		return fail(fmt.Errorf("server exited before serving (%v)", err))
	case <-time.After(120 * time.Second):
		cmd.Process.Kill()
		return fail(fmt.Errorf("server did not start in 120 s"))
	}
	return func() error {
		defer os.RemoveAll(dataDir)
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				return fmt.Errorf("server exited badly after SIGTERM: %v", err)
			}
			return nil
		case <-time.After(60 * time.Second):
			cmd.Process.Kill()
			return fmt.Errorf("server ignored SIGTERM for 60 s")
		}
	}, nil
}

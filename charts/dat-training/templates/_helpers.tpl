{{/*
Chart name.
*/}}
{{- define "dat-training.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The job API: a null or empty `api` (a key left blank) means the default, as in datctl, rather than no job.
*/}}
{{- define "dat-training.api" -}}
{{- .Values.api | default "pytorchjob" }}
{{- end }}

{{/*
The training job's name: .Values.name, else the release name. Every object of the run is named after it.
*/}}
{{- define "dat-training.jobName" -}}
{{- .Values.name | default .Release.Name }}
{{- end }}

{{/*
The ServiceAccount of the trainer pods. A TrainJob cannot set automountServiceAccountToken on its pods, so
without serviceAccountName the chart gives them their own ServiceAccount that mounts no token
(serviceaccount.yaml); a PyTorchJob's pods say so themselves and run as the namespace's default.
*/}}
{{- define "dat-training.trainerServiceAccount" -}}
{{- if .Values.serviceAccountName }}
{{- .Values.serviceAccountName }}
{{- else if eq (include "dat-training.api" .) "trainjob" }}
{{- include "dat-training.jobName" . }}-trainer
{{- end }}
{{- end }}

{{- define "dat-training.namespace" -}}
{{- .Values.namespace | default .Release.Namespace }}
{{- end }}

{{/*
Chart name and version as used by the chart label.
*/}}
{{- define "dat-training.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "dat-training.labels" -}}
helm.sh/chart: {{ include "dat-training.chart" . }}
{{ include "dat-training.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "dat-training.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dat-training.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dat-training.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
torchrun processes per pod: nprocPerNode, else one per GPU, else 1.
*/}}
{{- define "dat-training.nprocPerNode" -}}
{{- $gpus := int .Values.gpusPerNode }}
{{- if gt (int .Values.nprocPerNode) 0 }}{{ int .Values.nprocPerNode }}{{ else if gt $gpus 0 }}{{ $gpus }}{{ else }}1{{ end }}
{{- end }}

{{/*
The longest pod name the run creates (the operator also names a headless Service after each pod, so it must
stay a 63-character DNS label).
*/}}
{{- define "dat-training.longestPodName" -}}
{{- $name := include "dat-training.jobName" . }}
{{- if eq (include "dat-training.api" .) "trainjob" }}
{{- printf "%s-node-0-%d" $name (sub (int .Values.nodes) 1) }}
{{- else if .Values.elastic.enabled }}
{{- printf "%s-worker-%d" $name (sub (int .Values.elastic.maxNodes) 1) }}
{{- else if gt (int .Values.nodes) 1 }}
{{- printf "%s-worker-%d" $name (sub (int .Values.nodes) 2) }}
{{- else }}
{{- printf "%s-master-0" $name }}
{{- end }}
{{- end }}

{{/*
A monitoring-only release (job.enabled false) must watch every job and render something.
*/}}
{{- define "dat-training.validateMonitoring" -}}
{{- if not .Values.job.enabled }}
{{- if and (eq .Values.alerts.scope "release") (ne (toString .Values.alerts.enabled) "false") }}
{{- fail "job.enabled=false: alerts.scope=release would watch this release's job, and there is none; set alerts.scope=all (or alerts.enabled=false)" }}
{{- end }}
{{- if and (not .Values.dashboard.enabled) (not .Values.exporter.enabled) (not (include "dat-training.alertsEnabled" .)) }}
{{- fail "job.enabled=false with the dashboard and the exporter off and no alerts (alerts.enabled false, or auto where the cluster serves no PrometheusRule): this release would install nothing" }}
{{- end }}
{{- $exporter := printf "%s-exporter" (include "dat-training.jobName" .) }}
{{- if and .Values.exporter.enabled (gt (len $exporter) 63) }}
{{- fail (printf "name %q is too long: the exporter's Service and Deployment %q exceed 63 characters" (include "dat-training.jobName" .) $exporter) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Cross-field rules values.schema.json cannot express; `datctl render` reports the same ones before rendering.
*/}}
{{- define "dat-training.validate" -}}
{{- if .Values.trainerConfigFile }}
{{- fail "trainerConfigFile is read by datctl only; with helm put the trainer config inline under trainer: (or use datctl render)" }}
{{- end }}
{{- if and (eq .Values.data.source "pvc") (not .Values.data.claimName) }}
{{- fail "data.claimName: required when data.source is pvc (the claim holding the data set)" }}
{{- end }}
{{- $gpus := int .Values.gpusPerNode }}
{{- if and (gt $gpus 0) (ne (include "dat-training.nprocPerNode" .) (toString $gpus)) }}
{{- fail (printf "nprocPerNode %d does not match gpusPerNode %d: each torchrun process needs its own GPU" (int .Values.nprocPerNode) $gpus) }}
{{- end }}
{{- $name := include "dat-training.jobName" . }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "name %q must be a DNS-1035 label (lower-case letters, digits and '-', starting with a letter): set name" $name) }}
{{- end }}
{{- $pod := include "dat-training.longestPodName" . }}
{{- if gt (len $pod) 63 }}
{{- fail (printf "name %q is too long: pod name %q exceeds 63 characters" (include "dat-training.jobName" .) $pod) }}
{{- end }}
{{- $api := include "dat-training.api" . }}
{{- $dataset := (((.Values.trainer | default dict).data | default dict).name | default "digits") }}
{{- if and (eq $api "trainjob") (eq .Values.data.source "download") }}
{{- fail "data.source: download needs an init container, which api trainjob cannot add; use data.source: pvc" }}
{{- end }}
{{- if and (has $dataset (list "cifar10" "cifar10-ext")) (eq .Values.data.source "none") }}
{{- fail (printf "data.source: trainer data.name %s needs a data volume (pvc or download)" $dataset) }}
{{- end }}
{{- if and (eq $dataset "cifar10-ext") (eq .Values.data.source "download") }}
{{- fail "data.source: download fetches CIFAR-10 only; cifar10-ext needs the TI-500K pickle on a PVC (data.source: pvc)" }}
{{- end }}
{{- $nodes := int .Values.nodes }}
{{- if .Values.elastic.enabled }}
{{- if eq $api "trainjob" }}
{{- fail "elastic.enabled: not supported with api trainjob" }}
{{- end }}
{{- if or (lt $nodes (int .Values.elastic.minNodes)) (gt $nodes (int .Values.elastic.maxNodes)) }}
{{- fail (printf "elastic: nodes %d is outside minNodes..maxNodes (%d..%d)" $nodes (int .Values.elastic.minNodes) (int .Values.elastic.maxNodes)) }}
{{- end }}
{{- end }}
{{- $volcano := .Values.scheduling.volcano }}
{{- if $volcano.enabled }}
{{- if .Values.scheduling.kueueQueue }}
{{- fail "scheduling: kueueQueue and volcano.enabled cannot be combined (pick one scheduler)" }}
{{- end }}
{{- if eq $api "trainjob" }}
{{- fail "scheduling.volcano.enabled: not supported with api trainjob (use kueueQueue)" }}
{{- end }}
{{- if gt (int $volcano.minAvailable) $nodes }}
{{- fail (printf "scheduling.volcano.minAvailable: %d exceeds the %d pods the job creates (the gang would never be scheduled)" (int $volcano.minAvailable) $nodes) }}
{{- end }}
{{- end }}
{{- range .Values.extraVolumes }}
{{- if has .name (list "config" "dshm" "tmp" "checkpoints" "data") }}
{{- fail (printf "extraVolumes: the name %q is the chart's own volume; pick another" .name) }}
{{- end }}
{{- end }}
{{- range $key := list "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/component" }}
{{- if hasKey $.Values.podLabels $key }}
{{- fail (printf "podLabels.%s: set by the chart (its selectors and the PodMonitor use it)" $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The trainer config in the ConfigMap: .Values.trainer with the settings the job spec owns.
*/}}
{{- define "dat-training.trainerConfig" -}}
{{- $cfg := deepCopy (.Values.trainer | default dict) }}
{{- $metrics := dict "port" (int .Values.metrics.port) "job_name" (include "dat-training.jobName" .) }}
{{- if and (gt (int .Values.metrics.port) 0) (not (hasKey (get $cfg "metrics" | default dict) "grace_seconds")) }}
{{- $_ := set $metrics "grace_seconds" .Values.metrics.graceSeconds }}
{{- end }}
{{- $owned := dict "run" (dict "output_dir" (printf "%s/%s" .Values.checkpoint.mountPath (include "dat-training.jobName" .))) "metrics" $metrics }}
{{- if ne .Values.data.source "none" }}
{{- $_ := set $owned "data" (dict "root" .Values.data.mountPath) }}
{{- end }}
{{- toYaml (mergeOverwrite $cfg $owned) }}
{{- end }}

{{/*
Node labels for the node pool.
*/}}
{{- define "dat-training.nodeSelector" -}}
{{- $pool := .Values.nodePool }}
{{- $labels := dict }}
{{- if eq $pool.provider "gke" }}
{{- with $pool.accelerator }}{{ $_ := set $labels "cloud.google.com/gke-accelerator" . }}{{ end }}
{{- with $pool.name }}{{ $_ := set $labels "cloud.google.com/gke-nodepool" . }}{{ end }}
{{- else if eq $pool.provider "eks" }}
{{- with $pool.accelerator }}{{ $_ := set $labels "k8s.amazonaws.com/accelerator" . }}{{ end }}
{{- with $pool.name }}{{ $_ := set $labels "eks.amazonaws.com/nodegroup" . }}{{ end }}
{{- else if eq $pool.provider "aks" }}
{{- with $pool.accelerator }}{{ $_ := set $labels "accelerator" . }}{{ end }}
{{- with $pool.name }}{{ $_ := set $labels "kubernetes.azure.com/agentpool" . }}{{ end }}
{{- else if eq $pool.provider "nvidia" }}
{{- if gt (int .Values.gpusPerNode) 0 }}{{ $_ := set $labels "nvidia.com/gpu.present" "true" }}{{ end }}
{{- with $pool.accelerator }}{{ $_ := set $labels "nvidia.com/gpu.product" . }}{{ end }}
{{- end }}
{{- $labels = mergeOverwrite $labels ($pool.nodeSelector | default dict) }}
{{- if $labels }}{{ toYaml $labels }}{{ end }}
{{- end }}

{{- define "dat-training.tolerations" -}}
{{- $list := list }}
{{- if and .Values.nodePool.gpuToleration (gt (int .Values.gpusPerNode) 0) }}
{{- $list = append $list (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule") }}
{{- end }}
{{- $list = concat $list (.Values.nodePool.tolerations | default list) }}
{{- if $list }}{{ toYaml $list }}{{ end }}
{{- end }}

{{- define "dat-training.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .Values.securityContext.runAsUser }}
runAsGroup: {{ int .Values.securityContext.runAsGroup }}
fsGroup: {{ int .Values.securityContext.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "dat-training.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/*
Per-pod resources; GPUs from gpusPerNode.
*/}}
{{- define "dat-training.resources" -}}
{{- $res := deepCopy (.Values.resources | default dict) }}
{{- if gt (int .Values.gpusPerNode) 0 }}
{{- $limits := $res.limits | default dict }}
{{- $_ := set $limits "nvidia.com/gpu" (toString (int .Values.gpusPerNode)) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/*
The trainer command: dat-torchrun (torchrun that exits as its workers did, see trainer/launch.py) takes nodes,
rank and rendezvous from the operator's PET_* environment.
*/}}
{{- define "dat-training.command" -}}
["dat-torchrun", "-m", "trainer", "--config", "/etc/dat/config.yaml"]
{{- end }}

{{/*
Scratch directories live on the writable /tmp volume; the root filesystem is read-only.
*/}}
{{- define "dat-training.env" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: MPLCONFIGDIR
  value: /tmp/.config/matplotlib
- name: PYTHONUNBUFFERED
  value: "1"
- name: TORCH_ELASTIC_SHUTDOWN_TIMEOUT
  value: {{ sub (int .Values.terminationGracePeriodSeconds) 5 | quote }}
- name: DAT_JOB_NAME
  value: {{ include "dat-training.jobName" . | quote }}
- name: DAT_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- range $key, $value := .Values.nccl }}
- name: {{ $key }}
  value: {{ include "dat-training.envValue" $value }}
{{- end }}
{{- range $key, $value := .Values.env }}
- name: {{ $key }}
  value: {{ include "dat-training.envValue" $value }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "dat-training.volumeMounts" -}}
- name: config
  mountPath: /etc/dat
  readOnly: true
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
- name: checkpoints
  mountPath: {{ .Values.checkpoint.mountPath | quote }}
{{- if ne .Values.data.source "none" }}
- name: data
  mountPath: {{ .Values.data.mountPath | quote }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "dat-training.volumes" -}}
- name: config
  configMap:
    name: {{ include "dat-training.jobName" . }}-config
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shm.sizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmp.sizeLimit }}
- name: checkpoints
{{- if .Values.checkpoint.claimName }}
  persistentVolumeClaim:
    claimName: {{ .Values.checkpoint.claimName }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- if eq .Values.data.source "pvc" }}
- name: data
  persistentVolumeClaim:
    claimName: {{ .Values.data.claimName }}
    readOnly: true
{{- else if eq .Values.data.source "download" }}
- name: data
  emptyDir:
    sizeLimit: {{ .Values.data.downloadSizeLimit }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
data.source=download: fetch the CIFAR-10 archive (md5-checked) before torchrun starts; the trainer reads it.
*/}}
{{- define "dat-training.downloadContainer" -}}
- name: fetch-cifar10
  image: {{ include "dat-training.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - python
    - -c
    - from torchvision.datasets.utils import download_url; from trainer.data import CIFAR10_URL, CIFAR10_MD5; download_url(CIFAR10_URL, "{{ .Values.data.mountPath }}", md5=CIFAR10_MD5)
  env:  # HOME, and the spec's env and extraEnv (an HTTPS proxy, its credentials)
    - name: HOME
      value: /tmp
    {{- range $key, $value := .Values.env }}
    - name: {{ $key }}
      value: {{ include "dat-training.envValue" $value }}
    {{- end }}
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  resources:
    requests:
      cpu: 100m
      memory: 256Mi
    limits:
      memory: 512Mi
  securityContext:
    {{- include "dat-training.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - name: data
      mountPath: {{ .Values.data.mountPath | quote }}
    - name: tmp
      mountPath: /tmp
{{- end }}

{{/*
Annotations of every trainer pod: podAnnotations, and the checkov checks (tests/test_security_scan.py) that do
not fit a batch training pod, each with its reason. The operator copies them onto the pods, so a scanner of
the cluster sees the same documented exceptions. Project-wide skips: .checkov.yaml.
*/}}
{{- define "dat-training.trainerPodAnnotations" -}}
{{- $skips := dict }}
{{- $_ := set $skips "checkov.io/skip1" "CKV_K8S_8=Batch pod: the operator restarts a crashed one; an HTTP probe cannot see a hung collective" }}
{{- $_ := set $skips "checkov.io/skip2" "CKV_K8S_9=A readiness probe would delay the headless-Service DNS name the rendezvous needs" }}
{{- $_ := set $skips "checkov.io/skip3" "CKV_K8S_11=No CPU limit by default: throttling stalls DataLoader and NCCL threads; CPU is requested" }}
{{- if eq (include "dat-training.api" .) "trainjob" }}
{{- $_ := set $skips "checkov.io/skip4" "CKV_K8S_15=A TrainJob cannot set imagePullPolicy: the training runtime decides" }}
{{- if .Values.serviceAccountName }}
{{- $_ := set $skips "checkov.io/skip5" "CKV_K8S_38=A TrainJob cannot set automountServiceAccountToken: serviceAccountName decides" }}
{{- else }}
{{- $_ := set $skips "checkov.io/skip5" "CKV_K8S_38=A TrainJob cannot set it per pod: its ServiceAccount sets automountServiceAccountToken false" }}
{{- end }}
{{- end }}
{{- toYaml (merge (deepCopy (.Values.podAnnotations | default dict)) $skips) }}
{{- end }}

{{/*
The trainer pod of every PyTorchJob replica.
*/}}
{{- define "dat-training.podTemplate" -}}
metadata:
  labels:
    {{- include "dat-training.selectorLabels" . | nindent 4 }}
    app.kubernetes.io/component: trainer
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    {{- include "dat-training.trainerPodAnnotations" . | nindent 4 }}
spec:
  {{- with .Values.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: {{ int .Values.terminationGracePeriodSeconds }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.scheduling.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- if .Values.scheduling.volcano.enabled }}
  schedulerName: volcano
  {{- end }}
  securityContext:
    {{- include "dat-training.podSecurityContext" . | nindent 4 }}
  {{- with include "dat-training.nodeSelector" . }}
  nodeSelector:
    {{- . | nindent 4 }}
  {{- end }}
  {{- with include "dat-training.tolerations" . }}
  tolerations:
    {{- . | nindent 4 }}
  {{- end }}
  {{- with .Values.nodePool.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.nodePool.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- if eq .Values.data.source "download" }}
  initContainers:
    {{- include "dat-training.downloadContainer" . | nindent 4 }}
  {{- end }}
  containers:
    - name: pytorch
      image: {{ include "dat-training.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: {{ include "dat-training.command" . }}
      env:
        {{- include "dat-training.env" . | nindent 8 }}
      ports:
        - name: pytorchjob-port
          containerPort: 23456
          protocol: TCP
        {{- if gt (int .Values.metrics.port) 0 }}
        - name: metrics
          containerPort: {{ int .Values.metrics.port }}
          protocol: TCP
        {{- end }}
      resources:
        {{- include "dat-training.resources" . | nindent 8 }}
      securityContext:
        {{- include "dat-training.containerSecurityContext" . | nindent 8 }}
      volumeMounts:
        {{- include "dat-training.volumeMounts" . | nindent 8 }}
  volumes:
    {{- include "dat-training.volumes" . | nindent 4 }}
{{- end }}

{{/*
"true" when the PrometheusRule is rendered: alerts.enabled true, or auto and the cluster serves it.
*/}}
{{- define "dat-training.alertsEnabled" -}}
{{- $mode := toString .Values.alerts.enabled }}
{{- if or (eq $mode "true") (and (eq $mode "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PrometheusRule")) }}true{{ end }}
{{- end }}

{{/*
"true" when the PodMonitor is rendered: metrics on, and podMonitor true, or auto and the cluster serves
monitoring.coreos.com/v1.
*/}}
{{- define "dat-training.podMonitorEnabled" -}}
{{- $mode := toString .Values.metrics.podMonitor }}
{{- $wanted := or (eq $mode "true") (and (eq $mode "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) }}
{{- if and (gt (int .Values.metrics.port) 0) $wanted }}true{{ end }}
{{- end }}

{{/* The trainer container of a TrainJob node pod (the name the torch runtimes give it). */}}
{{- define "dat-training.trainJobContainer" -}}node{{- end }}

{{- define "dat-training.exporterMonitorEnabled" -}}
{{- $mode := toString .Values.metrics.podMonitor }}
{{- if or (eq $mode "true") (and (eq $mode "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) }}true{{ end }}
{{- end }}

{{/* An env value as a quoted string. Helm reads YAML numbers as float64, which print as 4.194304e+06: whole
numbers that fit in an int64 are printed as integers. */}}
{{- define "dat-training.envValue" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) (lt . 9.0e18) (gt . -9.0e18) -}}
{{ int64 . | toString | quote }}
{{- else -}}
{{ toString . | quote }}
{{- end -}}
{{- end }}

{{/*
Seconds in a Prometheus duration such as 1h30m (the alerts.*Window values; values.schema.json checks their form).
*/}}
{{- define "dat-training.durationSeconds" -}}
{{- $units := dict "ms" 0.001 "s" 1 "m" 60 "h" 3600 "d" 86400 "w" 604800 "y" 31536000 -}}
{{- $total := 0.0 -}}
{{- range regexFindAll "[0-9]+(ms|[smhdwy])" . -1 -}}
{{- $n := regexFind "^[0-9]+" . -}}
{{- $total = addf $total (mulf (float64 $n) (get $units (trimPrefix $n .))) -}}
{{- end -}}
{{- $total -}}
{{- end }}

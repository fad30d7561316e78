#!/usr/bin/env ruby
# nodemngr interoperability check with Ruby's xmlrpc library (Debian: ruby-xmlrpc).
# Usage: ruby_client.rb URL      Prints OK and exits 0, or prints what failed and exits 1.
require 'xmlrpc/client'

url = ARGV[0]
if url.nil?
  puts "usage: #{$0} URL"
  exit 1
end

$failed = false
def fail!(msg)
  puts "FAIL: #{msg}"
  $failed = true
end

begin
  client = XMLRPC::Client.new2(url)

  # 1. newPort with a string info
  p1 = client.call('newPort', 'ruby client')
  raise "newPort(string) returned #{p1.inspect}, not an Integer" unless p1.is_a?(Integer)
  puts p1

  # 2. newPort with a struct info
  p2 = client.call('newPort', { 'service' => 'echo', 'n' => 3 })
  raise "newPort(struct) returned #{p2.inspect}, not an Integer" unless p2.is_a?(Integer)
  puts p2
  fail!("newPort gave the same port twice: #{p1}") if p1 == p2

  # 3. listPorts shows both, with their info
  list = client.call('listPorts')
  raise "listPorts returned #{list.class}, not an Array" unless list.is_a?(Array)
  by_port = {}
  list.each { |e| by_port[e['port']] = e }
  e1 = by_port[p1]
  e2 = by_port[p2]
  if e1.nil?
    fail!("port #{p1} missing from listPorts")
  elsif e1['info'] != 'ruby client'
    fail!("port #{p1} info is #{e1['info'].inspect}, not \"ruby client\"")
  end
  if e2.nil?
    fail!("port #{p2} missing from listPorts")
  elsif e2['info'] != { 'service' => 'echo', 'n' => 3 }
    fail!("port #{p2} info is #{e2['info'].inspect}, not {service: echo, n: 3}")
  end
  [e1, e2].compact.each do |e|
    %w[port name info pid since].each do |k|
      fail!("listPorts entry for #{e['port']} has no '#{k}'") unless e.key?(k)
    end
    fail!("pid of #{e['port']} is #{e['pid'].inspect}, not an Integer") unless e['pid'].is_a?(Integer)
  end
  ports = list.map { |e| e['port'] }
  fail!("listPorts is not sorted by port: #{ports.inspect}") unless ports == ports.sort
  fail!("listPorts entry for #{p2} has name #{e2['name'].inspect}, not \"\"") if e2 && e2['name'] != ''

  # 3b. lookup by name: the string info is the name; an unknown name is an empty array
  found = client.call('lookup', 'ruby client')
  if !found.is_a?(Array) || found.size != 1 || found[0]['port'] != p1 || found[0]['name'] != 'ruby client'
    fail!("lookup('ruby client') is #{found.inspect}, not one entry for port #{p1}")
  end
  none = client.call('lookup', 'no such ruby name')
  fail!("lookup of an unknown name is #{none.inspect}, not []") unless none == []
  begin
    client.call('lookup', 7)
    fail!('lookup(7) did not fault')
  rescue XMLRPC::FaultException => e
    fail!("lookup(7) fault code is #{e.faultCode.inspect}, not 3") unless e.faultCode == 3
  end

  # 4. delPort of a port not registered: fault code 1
  begin
    r = client.call('delPort', 1)
    fail!("delPort(1) did not fault, returned #{r.inspect}")
  rescue XMLRPC::FaultException => e
    fail!("delPort(1) fault code is #{e.faultCode.inspect}, not 1") unless e.faultCode == 1
    unless e.faultString =~ /Node manager: Unknown port: 1\b/
      fail!("delPort(1) fault string is #{e.faultString.inspect}")
    end
  end

  # 5. give both ports back
  [p1, p2].each do |p|
    r = client.call('delPort', p)
    fail!("delPort(#{p}) returned #{r.inspect}, not 0") unless r == 0
  end
rescue XMLRPC::FaultException => e
  fail!("unexpected fault #{e.faultCode}: #{e.faultString}")
rescue StandardError => e
  fail!("#{e.class}: #{e.message}")
end

exit 1 if $failed
puts 'OK'
exit 0
